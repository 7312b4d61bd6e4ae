"""Storage failures in words: what went wrong with the disk, and the step that fits it.

torch, safetensors, numpy and tokenizers each report a full disk or a read-only directory in their
own way (an OSError, a RuntimeError from torch's zip writer, a SafetensorError holding the OS
error's text). `storage_problem` recognises them all, so each command ends such a failure in one
line; anything it does not recognise is a bug, and its traceback is shown.
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass
from typing import Iterator, Optional


@dataclass(frozen=True)
class StorageProblem:
    what: str  # e.g. "no space left on the device"
    advice: str  # e.g. "free space"
    path: Optional[str] = None  # the file it concerned, where the error names one


_BY_ERRNO = {
    errno.ENOSPC: ("no space left on the device", "free space"),
    errno.EDQUOT: ("the disk quota is exceeded", "free space or raise the quota"),
    errno.EROFS: ("the file system is read-only", "use a writable directory"),
    errno.EACCES: ("permission denied", "check the directory's permissions"),
    errno.EPERM: ("operation not permitted", "check the directory's permissions"),
    errno.ENAMETOOLONG: ("a file name is too long", "use a shorter path or run name (--name)"),
    errno.ENOTDIR: ("a part of the path is a file, not a directory", "choose another path"),
    errno.EISDIR: ("a directory stands where a file should be", "choose another path"),
    errno.EEXIST: ("a file stands where a directory should be", "move it away or choose another path"),
    errno.ENOENT: ("a directory in the path does not exist (or was removed)", "check the path"),
    errno.EIO: ("an input/output error from the device", "check the disk"),
    errno.EMFILE: ("too many open files", "raise the open-file limit (ulimit -n)"),
}

# the OS's own words, as other libraries pass them on inside their messages
_BY_TEXT = [(re.compile(pattern, re.I), code) for pattern, code in (
    (r"no space left on device|os error 28", errno.ENOSPC),
    (r"disk quota exceeded|os error 122", errno.EDQUOT),
    (r"read-only file system|os error 30", errno.EROFS),
    (r"permission denied|os error 13", errno.EACCES),
    (r"file name too long|os error 36", errno.ENAMETOOLONG),
    (r"not a directory|os error 20", errno.ENOTDIR),
    (r"input/output error|os error 5\b", errno.EIO),
)]


def _chain(e: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    link: Optional[BaseException] = e
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        yield link
        link = link.__cause__ or link.__context__


# what torch's zip writer says when a write failed, without the OS's reason
_WRITE_FAILED = re.compile(r"PytorchStreamWriter failed|file write failed|unexpected pos \d+ vs \d+|"
                           r"basic_ios::clear|iostream error", re.I)


def _filesystem_state(directory: str) -> Optional[int]:
    """An errno the file system holding `directory` explains a failed write with: full or read-only."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return None
    if st.f_flag & os.ST_RDONLY:
        return errno.EROFS
    if st.f_bavail * st.f_frsize < 1 << 20:
        return errno.ENOSPC
    return None


def storage_problem(e: BaseException, directory: Optional[str] = None) -> Optional[StorageProblem]:
    """The storage failure behind `e` (or an exception it came from), or None when it is not one.
    `directory` is where the failed write went: when the error itself does not say why (torch's
    zip writer does not), the state of that file system does."""
    for err in _chain(e):
        if isinstance(err, OSError) and err.errno in _BY_ERRNO:
            what, advice = _BY_ERRNO[err.errno]
            return StorageProblem(what, advice, err.filename)
    for err in _chain(e):
        if isinstance(err, (OSError, RuntimeError, ValueError)) or type(err).__name__ == "SafetensorError":
            for pattern, code in _BY_TEXT:
                if pattern.search(str(err)):
                    return StorageProblem(*_BY_ERRNO[code])
    if any(_WRITE_FAILED.search(str(err)) for err in _chain(e)):
        state = _filesystem_state(directory) if directory else None
        if state is not None:
            return StorageProblem(*_BY_ERRNO[state], directory)
        return StorageProblem("a write failed", "check that the disk has space and is writable", directory)
    return None


def describe(e: BaseException) -> Optional[str]:
    """A storage failure as "what (file)": advice is left to the caller, who knows what is intact."""
    p = storage_problem(e)
    if p is None:
        return None
    return p.what + (f" ({p.path})" if p.path else "")
