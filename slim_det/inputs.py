"""Checks of what a user gives slim_det's tools: config files, images and output paths.

Each check raises `InputError` with a message that names the bad value and what is allowed. The
tools run their work inside `exit_on_input_error`, so such an error ends the process with that
message on stderr and exit status 2, without a traceback; called from Python, the functions raise
`InputError` (a `ValueError`) as usual.
"""
import contextlib
import json
import os
import sys

import yaml

__all__ = [
    "InputError",
    "exit_on_input_error",
    "read_config_data",
    "merge_config_file",
    "merge_config_opts",
    "read_image_file",
    "check_writable_file",
    "check_writable_dir",
    "IMAGE_SUFFIXES",
]

# What detectron2's read_image (PIL) reads and cv2.imwrite writes alike.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class InputError(ValueError):
    """A value given to slim_det (a file, a path, a setting) that cannot be used as it is.

    The message names the value and what is allowed.
    """


@contextlib.contextmanager
def exit_on_input_error(prog):
    """Turn an `InputError` raised inside the block into ``prog: error: <message>`` and exit 2.

    Args:
        prog (str): the tool's name, printed before the message (e.g. ``"export_width.py"``).

    Raises:
        SystemExit: with status 2, after printing the message to stderr.
    """
    try:
        yield
    except InputError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def _describe_position(line, column):
    return f"line {line}, column {column}"


def read_config_data(path, what="config file"):
    """Parse a JSON (``.json``) or YAML (any other name) file and return its data.

    Args:
        path (str): the file.
        what (str): what the file is, for messages (e.g. ``"--config-file"``).

    Returns:
        The parsed data (dict, list, ...).

    Raises:
        InputError: when the file does not exist or does not parse, naming the file and where.
        yaml.constructor.ConstructorError: YAML that parses but holds tags (e.g. ``!!python/``)
            that ``yaml.safe_load`` does not build.
    """
    if not os.path.isfile(path):
        raise InputError(
            f"{what} {path!r} is not a file; give the path of a YAML (or .json) file."
        )
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.lower().endswith(".json"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise InputError(
                f"{what} {path!r} is not valid JSON "
                f"({_describe_position(error.lineno, error.colno)}: {error.msg}); fix the file or "
                "give another one."
            ) from None
    try:
        return yaml.safe_load(text)
    except yaml.constructor.ConstructorError:
        raise  # it parses, but holds tags safe_load does not build: the caller decides
    except yaml.YAMLError as error:
        raise InputError(_yaml_message(what, path, error)) from None


def _yaml_message(what, path, error):
    mark = getattr(error, "problem_mark", None)
    where = f"{_describe_position(mark.line + 1, mark.column + 1)}: " if mark else ""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    return (f"{what} {path!r} is not valid YAML ({where}{problem}); fix the file or give another "
            "one.")


def merge_config_file(cfg, path, what="config file"):
    """``cfg.merge_from_file(path)``, with one clear error for a file that cannot be merged.

    Covers a missing file, YAML / JSON that does not parse (in the file or a ``_BASE_`` it names),
    a file that is not a mapping of config keys, a key the config does not have and a value of
    the wrong type.

    Args:
        cfg (CfgNode): the config to merge into (detectron2's keys plus slim_det's).
        path (str): the config file.
        what (str): what the file is, for messages.

    Returns:
        CfgNode: ``cfg``.

    Raises:
        InputError: naming the file and the problem.
    """
    try:
        data = read_config_data(path, what)
    except yaml.constructor.ConstructorError:
        data = {}  # Python tags: detectron2 loads those itself (allow_unsafe), so let it decide
    if not isinstance(data, dict):
        raise InputError(f"{what} {path!r} must hold a mapping of config keys (e.g. 'MODEL: ...'); "
                         f"it holds a {type(data).__name__}.")
    try:
        cfg.merge_from_file(path)
    except yaml.YAMLError as error:  # in a _BASE_ file
        mark = getattr(error, "problem_mark", None)
        base = getattr(mark, "name", None) or path
        raise InputError(_yaml_message(f"{what} (through _BASE_)", base, error)) from None
    except (FileNotFoundError, IsADirectoryError) as error:
        raise InputError(f"{what} {path!r} names a _BASE_ file that does not exist: "
                         f"{error.filename!r}.") from None
    except KeyError as error:
        raise InputError(f"{what} {path!r}: {_key_error_text(error)}; it is not a detectron2 or "
                         "slim_det config key (check its spelling and nesting).") from None
    except (ValueError, AssertionError, TypeError) as error:
        raise InputError(f"{what} {path!r} cannot be merged: {error}") from None
    return cfg


def merge_config_opts(cfg, opts):
    """``cfg.merge_from_list(opts)``, with one clear error for a bad ``KEY VALUE`` pair.

    Args:
        cfg (CfgNode): the config.
        opts (list[str]): ``KEY VALUE`` pairs from the command line.

    Returns:
        CfgNode: ``cfg``.

    Raises:
        InputError: naming the pair and the problem (odd length, unknown key, wrong type).
    """
    opts = list(opts)
    if len(opts) % 2:
        raise InputError(f"Config overrides must be KEY VALUE pairs; got {len(opts)} word(s), "
                         f"the last {opts[-1]!r} without a value.")
    try:
        cfg.merge_from_list(opts)
    except KeyError as error:
        raise InputError(f"Config override {_key_error_text(error)}; it is not a detectron2 or "
                         "slim_det config key (check its spelling).") from None
    except (ValueError, AssertionError, TypeError) as error:
        raise InputError(f"Config override rejected ({error}); overrides are KEY VALUE pairs of "
                         "existing config keys, each value of its key's type.") from None
    return cfg


def _key_error_text(error):
    text = error.args[0] if error.args else str(error)
    return str(text).rstrip(".!")


def read_image_file(path, image_format, what="--input"):
    """Read an image as detectron2's ``read_image`` does, with one clear error for a non-image.

    Args:
        path (str): the image file.
        image_format (str): the channel order to return (e.g. ``"BGR"``, INPUT.FORMAT).
        what (str): the flag or setting that named the file, for messages.

    Returns:
        np.ndarray: the image, (H, W, C).

    Raises:
        InputError: when the file is missing or not an image PIL can read.
    """
    from detectron2.data.detection_utils import read_image  # detectron2 is slow to import

    allowed = ", ".join(s.lstrip(".").upper() for s in IMAGE_SUFFIXES)
    if not os.path.isfile(path):
        raise InputError(f"{what} {path!r} is not a file; give an image file ({allowed}).")
    try:
        return read_image(path, format=image_format)
    except (OSError, ValueError, SyntaxError) as error:  # PIL: UnidentifiedImageError, truncated
        reason = str(error).split(" <")[0]
        raise InputError(f"{what} {path!r} is not an image PIL can read ({reason}); give an image "
                         f"file ({allowed}).") from None


def _nearest_existing(folder):
    while not os.path.exists(folder):
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    return folder


def _check_folder(path, folder, what):
    existing = _nearest_existing(folder)
    if not os.path.isdir(existing):
        raise InputError(f"{what} {path!r} cannot be written: {existing!r} is a file, not a "
                         "folder; give a path in a writable folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{what} {path!r} cannot be written: folder {existing!r} is not writable; "
                         "give a path in a writable folder.")


def check_writable_file(path, what="--output", suffixes=None):
    """Check, before any work, that a file can be written at ``path``; creates nothing.

    The folder may not exist yet: its nearest existing ancestor must be a writable folder.

    Args:
        path (str): the output file.
        what (str): the flag that named it, for messages.
        suffixes (Sequence[str] or None): the allowed file name endings (e.g. IMAGE_SUFFIXES).

    Returns:
        str: ``path``.

    Raises:
        InputError: naming the path and what is allowed.
    """
    if not path:
        raise InputError(f"{what} is empty; give the path of the file to write.")
    if os.path.isdir(path):
        raise InputError(f"{what} {path!r} is a folder; give the path of a file to write.")
    if suffixes is not None and not path.lower().endswith(tuple(suffixes)):
        raise InputError(f"{what} {path!r} must end in one of {', '.join(suffixes)}.")
    _check_folder(path, os.path.dirname(os.path.abspath(path)), what)
    return path


def check_writable_dir(path, what="--output"):
    """Check, before any work, that ``path`` is or can become a writable folder; creates nothing.

    Args:
        path (str): the output folder.
        what (str): the flag that named it, for messages.

    Returns:
        str: ``path``.

    Raises:
        InputError: naming the path when it is a file or lies where nothing can be written.
    """
    if not path:
        raise InputError(f"{what} is empty; give the folder to write into.")
    if os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f"{what} {path!r} is a file; give a folder to write into (it is created "
                         "if needed).")
    _check_folder(path, os.path.abspath(path), what)
    return path
