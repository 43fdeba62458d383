"""Reading and writing data: dataset folders (and, later, maps and bags)."""
from instascene_ros.core.io.dataset import (Dataset, DatasetError, DatasetWriter, load_dataset,
                                            write_dataset)

__all__ = ["Dataset", "DatasetError", "DatasetWriter", "load_dataset", "write_dataset"]
