"""The archive's storage: the declared array table, locations, versions and plain reads.

    table.py       the arrays of a format-2 archive (name, dimensions, dtype, chunks, role)
    storage.py     where an archive lives: local, memory://, s3://, or a plain Zarr snapshot
    repository.py  Icechunk transactions, the writer's lock, versions and compaction
    reader.py      checked reads of one version (the data half of the read contract)
    export.py      a plain Zarr v3 snapshot of one version (directory or zip)
"""

from medustore.archive.repository import Retention

__all__ = ["Retention"]
