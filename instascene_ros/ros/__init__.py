"""Thin rclpy layer: message conversion, nodes, launching. No algorithms live here."""
