"""Creating the files: ``qemu-img create``'s front end, and writing a planned image.

:func:`run_create` parses what the user typed (options, backing file checks,
the "Formatting ..." line); :func:`create_image` writes cluster 0 and the
planned metadata into a new file (and sizes the data file) through the
host-file layer; :func:`create_raw` makes a raw image.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from ..chain import close_chain
from ..errors import ImageError
from ..hostfile import HostFile
from ..opening import open_layer, probe_format
from .options import (
    _BOOL,
    _DEFAULTS,
    _PRINT_ORDER,
    _QCOW2_OPTIONS,
    _RAW_OPTIONS,
    _SIZE_HINT,
    CreateError,
    CreateOptions,
    ImageTooLarge,
    parse_option_string,
    parse_size,
)
from .plan import Plan, plan_image


def _fill(file: HostFile, start: int, end: int, mode: str) -> None:
    """Preallocate [start, end) like file-posix: fallocate, or write zeros (``full``, ``zero``)."""
    if mode == "falloc":
        file.preallocate(start, end - start)
    else:
        file.write_zero_bytes(start, end - start)


def _size_data_file(file: HostFile, plan: Plan) -> None:
    """Grow the new (empty) data file as qemu's file driver does."""
    length, mode = plan.data_file
    if plan.data_cow:
        _fill(file, *plan.data_cow, "zero")
    else:
        if mode == "off":
            file.truncate(length)
        else:
            _fill(file, 0, length, mode)
        if length:  # file-posix writes the first block when growing from 0 (alignment probing)
            file.write(0, bytes(512 if length < 4096 else 4096))
    file.truncate(length)


def _create_file(path: str) -> HostFile:
    try:
        return HostFile(path, create=True)
    except OSError as e:
        raise CreateError(f"Could not create '{path}': {e.strerror}") from None


def create_image(filename: str, size: int, **options: object) -> None:
    """Create ``filename`` as ``qemu-img create -f qcow2`` would, byte for byte where it can.

    ``size`` is rounded up to 512 bytes; ``options`` are :class:`CreateOptions`
    fields.  ``data_file`` is created (or truncated) at the path given and
    recorded verbatim, as qemu does.  The backing file is only recorded;
    callers that want it checked open it first.  Raises :class:`CreateError`
    with qemu-img's message; on failure the new files are removed, as qemu does.
    """
    opts = CreateOptions(**options)
    plan, header = plan_image(size, opts)
    created: list[str] = []
    try:
        file = _create_file(filename)
        created.append(filename)
        try:
            file.write(0, header)
            for w in plan.writes:
                file.write(w.offset, w.data())
            for start, end, mode in sorted(plan.prealloc):
                _fill(file, start, end, mode)
            file.truncate(max(plan.file_length, len(header)))
            file.flush()
        finally:
            file.close()
        if opts.data_file is not None:
            data = _create_file(opts.data_file)
            created.append(opts.data_file)
            try:
                _size_data_file(data, plan)
                data.flush()
            finally:
                data.close()
    except BaseException:
        for path in created:
            try:
                os.unlink(path)
            except OSError:
                pass
        raise


def run_create(
    filename: str,
    size_arg: str | None,
    *,
    fmt: str = "qcow2",
    options: list[str] | None = None,
    backing: str | None = None,
    backing_fmt: str | None = None,
    unsafe: bool = False,
    quiet: bool = False,
    out: Callable[[str], object] = print,
) -> None:
    """``qemu-img create``'s front end: option parsing, backing checks, then :func:`create_image`."""
    where = f"{filename}: "
    if fmt not in ("qcow2", "raw"):
        raise CreateError(where + f"Unknown file format '{fmt}'")
    opts: dict[str, str] = {}
    for text in options or []:
        for key, value in parse_option_string(text):
            allowed = _QCOW2_OPTIONS if fmt == "qcow2" else _RAW_OPTIONS
            if key not in allowed:
                raise CreateError(where + f"Invalid parameter '{key}'")
            opts[key] = value
    if "encryption" in opts or "encrypt.format" in opts:
        raise CreateError(where + "encrypted images are not supported")
    if backing is not None:
        opts["backing_file"] = backing
    if backing_fmt is not None:
        opts["backing_fmt"] = backing_fmt

    def size_opt(name: str) -> int:
        value = parse_size(opts[name])
        if value is None:
            raise CreateError(
                where + f"Parameter '{name}' expects a non-negative number below 2^64\n"
                "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
                "and exabytes, respectively."
            )
        return value

    size: int | None = None
    if size_arg is not None:
        size = parse_size(size_arg)
        if size is None:
            raise CreateError("Invalid image size specified. " + _SIZE_HINT)
        if size > (1 << 63) - 1:
            raise CreateError(f"Invalid image size specified. Must be between 0 and {(1 << 63) - 1}.")
        if "size" in opts:
            raise CreateError(where + "The image size must be specified only once")
    elif "size" in opts:
        size = size_opt("size")

    bfile, bfmt = opts.get("backing_file"), opts.get("backing_fmt")
    if bfile is not None:
        if bfile == filename:
            raise CreateError(
                where + "Error: Trying to create an image with the same filename as the backing file"
            )
        if not bfile:
            raise CreateError(where + "Expected backing file name, got empty string")
        if not unsafe:
            size = _check_backing(where, filename, bfile, bfmt, size)
        elif bfmt is None:
            raise CreateError(where + "Backing file specified without backing format")
    if size is None:
        raise CreateError(where + "Image creation needs a size parameter")
    if size_arg is not None or "size" not in opts:
        opts["size"] = str(size)

    kwargs: dict = {}
    if fmt == "qcow2":
        if "cluster_size" in opts:
            kwargs["cluster_size"] = size_opt("cluster_size")
            opts["cluster_size"] = str(kwargs["cluster_size"])
        for name in ("extended_l2", "lazy_refcounts", "data_file_raw"):
            if name in opts:
                if opts[name] not in _BOOL:
                    raise CreateError(where + f"Parameter '{name}' expects 'on' or 'off'")
                kwargs[name] = _BOOL[opts[name]]
        if "refcount_bits" in opts:
            if not opts["refcount_bits"].isdigit():
                raise CreateError(where + "Parameter 'refcount_bits' expects a number")
            kwargs["refcount_bits"] = int(opts["refcount_bits"])
        if "compat" in opts:  # an unknown level is refused by the driver, after "Formatting"
            kwargs["version"] = {"0.10": 2, "v2": 2, "1.1": 3, "v3": 3}.get(opts["compat"], 0)
        for name in ("compression_type", "preallocation", "data_file"):
            if name in opts:
                kwargs[name] = opts[name]
        kwargs["backing_file"], kwargs["backing_format"] = bfile, bfmt
    elif "preallocation" in opts:
        kwargs["preallocation"] = opts["preallocation"]
    if not quiet:
        shown = dict(_DEFAULTS) if fmt == "qcow2" else {}
        shown.update({k: v for k, v in opts.items() if k != "size"})
        shown["size"] = str(size)
        line = " ".join(f"{k}={shown[k]}" for k in _PRINT_ORDER if k in shown)
        out(f"Formatting '{filename}', fmt={fmt} {line}")
    if kwargs.get("version") == 0:
        raise CreateError(where + f"Parameter 'version' does not accept value '{opts['compat']}'")
    try:
        if fmt == "raw":
            create_raw(filename, size, preallocation=kwargs.get("preallocation", "off"))
        else:
            create_image(filename, size, **kwargs)
    except ImageTooLarge as e:  # qemu-img hints whenever the format has a cluster_size option
        hint = " (try using a larger cluster size)" if fmt == "qcow2" else ""
        raise CreateError(where + str(e) + hint) from None
    except CreateError as e:
        raise CreateError(where + str(e)) from None


def _check_backing(where: str, filename: str, bfile: str, bfmt: str | None, size: int | None) -> int | None:
    """Open the backing image as qemu-img does (relative to the new image); its size if none given."""
    path = bfile
    if not os.path.isabs(path):
        path = os.path.join(os.path.dirname(filename), path)
    try:
        os.stat(path)
    except OSError as e:
        raise CreateError(
            where + f"Could not open '{path}': {e.strerror}\nCould not open backing image."
        ) from None
    try:
        layer = open_layer(path, bfmt) if bfmt else None
        detected = probe_format(path) if bfmt is None else None
    except FileNotFoundError as e:
        raise CreateError(
            where + f"Could not open '{path}': {e.strerror}\nCould not open backing image."
        ) from None
    except (ImageError, OSError, ValueError) as e:
        raise CreateError(where + f"{e}\nCould not open backing image.") from None
    if layer is None:
        raise CreateError(
            where + f"Backing file specified without backing format\nDetected format of {detected}."
        )
    try:
        if size is None:
            size = -(-layer.size // 512) * 512
    finally:
        close_chain(layer)
    return size


def create_raw(filename: str, size: int, *, preallocation: str = "off") -> None:
    """``-f raw``: a sparse file of ``size`` (rounded up to 512), or preallocated."""
    if preallocation not in ("off", "falloc", "full"):
        raise CreateError(f"Unsupported preallocation mode '{preallocation}'")
    size = -(-size // 512) * 512
    file = _create_file(filename)
    try:
        if preallocation != "off":
            _fill(file, 0, size, preallocation)
        file.truncate(size)
    finally:
        file.close()
