"""The qcow2 format itself: structures, entry rules and codecs, bytes in and values out.

Nothing here opens or writes a file: ``layout`` declares the on-disk
structures, ``header`` parses and builds cluster 0, ``l2`` decodes L2
entries, ``refblock`` is the refcount-block codec, ``snapshots`` and
``bitmaps`` walk their tables, ``compression`` inflates compressed clusters.
"""
