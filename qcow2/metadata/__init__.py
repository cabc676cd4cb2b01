"""The one owner of an image's metadata and its parts.

``owner`` (header fields, feature bits, L1, pending frees, the write-back
order), ``cache`` (decoded L2 tables and refcount blocks), ``refcounts``
(counting and QEMU's allocator), ``overlap`` (where metadata lives, checked
before every write).
"""
