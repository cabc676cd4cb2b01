"""NBD server exporting qcow2 (and raw) images."""
