"""The labelling page: a local web server over a dataset's inbox (`visiond label DATASET_DIR`)."""

from visiond.label.server import LabelServer, make_server
from visiond.label.session import LabelSession, default_classes

__all__ = ["LabelServer", "LabelSession", "default_classes", "make_server"]
