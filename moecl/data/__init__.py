"""Task datasets: the on-disk format, validation and importers."""

from moecl.data.task import Record, TaskData

__all__ = ["Record", "TaskData"]
