"""ROS-free core library: numpy/torch in, numpy/torch out."""
