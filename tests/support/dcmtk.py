"""Thin wrappers around the DCMTK command-line SCUs (storescu, echoscu), used as REAL modalities in tests.

Return codes are NOT checked here (unless ``check=True``): tests assert on ``.returncode`` and can print
``.stderr`` (DCMTK logs there; ``-v`` is on by default so failures explain themselves).

Why ``propose="auto"``: by default storescu proposes only the uncompressed transfer syntaxes, so a JPEG or
JPEG 2000 file fails with "unable to convert dataset ... to 'Little Endian Explicit'" (DCMTK cannot decode
J2K), and ``-R`` does not change that. Its default SOP class list also lacks some classes (e.g.
Comprehensive 3D SR). So "auto" reads each file's meta header and writes a one-off association
negotiation profile (``-xf``) proposing exactly the (SOP class, transfer syntax) pairs being sent, plus an
uncompressed fallback context per SOP class.
"""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

from pydicom.filereader import read_file_meta_info

from tests.support.peers import is_present, tool

EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
UNCOMPRESSED = (EXPLICIT_LE, IMPLICIT_LE, EXPLICIT_BE)

# storescu options that already choose what to propose: with any of them, "auto" stays out of the way.
_PROPOSAL_OPTIONS = ("-x", "--propose", "-R", "--required", "+C", "--combine", "--config-file", "+sd")
_PROPOSAL_LONG = ("--scan-directories",)

Propose = Literal["auto", "storescu"]


def dcmtk_available() -> bool:
    return is_present("dcmtk")


def _tool(name: str) -> str:
    return tool(name, "dcmtk")


def _caller_chose_proposal(extra_args: Sequence[str]) -> bool:
    return any(arg.startswith(_PROPOSAL_OPTIONS) or arg in _PROPOSAL_LONG for arg in extra_args)


def negotiation_profile(files: Iterable[Path], profile: str = "CXRTEST") -> str | None:
    """An asconfig-format profile proposing exactly the files' (SOP class, TS) pairs; None if unreadable.

    Each pair gets its own single-TS context (so compressed files travel as-is), plus one uncompressed
    context per SOP class so uncompressed files let the SCP pick and DCMTK can fall back when it can decode.
    """
    pairs: dict[tuple[str, str], None] = {}
    for path in files:
        try:
            meta = read_file_meta_info(path)
            sop_class = str(meta.MediaStorageSOPClassUID)
            syntax = str(meta.TransferSyntaxUID)
        except Exception:  # no/short meta header, not DICOM: let storescu report it itself
            return None
        pairs[(sop_class, syntax)] = None
    sop_classes = list(dict.fromkeys(sop for sop, _ in pairs))
    compressed = list(dict.fromkeys(ts for _, ts in pairs if ts not in UNCOMPRESSED))
    contexts = [(sop, f"TS{compressed.index(ts)}") for sop, ts in pairs if ts in compressed]
    contexts += [(sop, "TSU") for sop in sop_classes]
    if len(contexts) > 128:  # the DICOM limit on presentation contexts per association
        return None
    lines = ["[[TransferSyntaxes]]"]
    for i, ts in enumerate(compressed):
        lines += [f"[TS{i}]", f"TransferSyntax1 = {ts}"]
    lines += ["[TSU]"] + [f"TransferSyntax{i + 1} = {ts}" for i, ts in enumerate(UNCOMPRESSED)]
    lines += ["", "[[PresentationContexts]]", "[Contexts]"]
    lines += [f"PresentationContext{i + 1} = {sop}\\{ts}" for i, (sop, ts) in enumerate(contexts)]
    lines += ["", "[[Profiles]]", f"[{profile}]", "PresentationContexts = Contexts", ""]
    return "\n".join(lines)


def storescu(
    host: str,
    port: int,
    files: Iterable[Path | str],
    *,
    called_aet: str,
    calling_aet: str = "STORESCU",
    extra_args: Sequence[str] = (),
    propose: Propose = "auto",
    timeout: float = 120.0,
    verbose: bool = True,
    check: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Send files with one storescu association (C-STORE each), like a modality would.

    ``propose="auto"`` (see module doc) proposes exactly what the files need; it falls back to storescu's
    own proposal when ``extra_args`` carries proposal options (``-x*``, ``-R``, ``+C``, ``-xf``, ``+sd``),
    when a path is a directory, or a file has no meta header; ``propose="storescu"`` always leaves it to
    storescu.
    ``timeout`` bounds the whole run (subprocess) and the DIMSE/ACSE waits. Raises
    ``subprocess.TimeoutExpired`` if storescu hangs; ``CalledProcessError`` only when ``check``.
    """
    with tempfile.TemporaryDirectory(prefix="storescu-") as tmp:
        args = _storescu_args(
            host, port, files, Path(tmp), called_aet, calling_aet, extra_args, propose, timeout, verbose
        )
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=check)


def storescu_process(
    host: str,
    port: int,
    files: Iterable[Path | str],
    *,
    called_aet: str,
    profile_dir: Path,
    calling_aet: str = "STORESCU",
    timeout: float = 120.0,
) -> subprocess.Popen[str]:
    """``storescu`` as above, running in the background (``communicate()`` for its outcome)."""
    profile_dir.mkdir(parents=True, exist_ok=True)
    args = _storescu_args(host, port, files, profile_dir, called_aet, calling_aet, (), "auto", timeout, True)
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _storescu_args(
    host: str,
    port: int,
    files: Iterable[Path | str],
    tmp: Path,
    called_aet: str,
    calling_aet: str,
    extra_args: Sequence[str],
    propose: Propose,
    timeout: float,
    verbose: bool,
) -> list[str]:
    paths = [Path(f) for f in files]
    net_timeout = str(max(1, int(timeout)))
    # Timeouts first so that the same options in extra_args (later on the line) override them.
    args = [_tool("storescu"), "-to", net_timeout, "-ta", net_timeout, "-td", net_timeout]
    if verbose:
        args.append("-v")
    auto = propose == "auto" and not _caller_chose_proposal(extra_args)
    if auto and paths and all(p.is_file() for p in paths):
        profile = negotiation_profile(paths)
        if profile is not None:
            config = tmp / "storescu.cfg"
            config.write_text(profile)
            args += ["-xf", str(config), "CXRTEST"]
    return [*args, "-aet", calling_aet, "-aec", called_aet, *extra_args, host, str(port), *map(str, paths)]


def echoscu(
    host: str,
    port: int,
    *,
    called_aet: str,
    calling_aet: str = "ECHOSCU",
    extra_args: Sequence[str] = (),
    timeout: float = 30.0,
    verbose: bool = True,
    check: bool = False,
) -> subprocess.CompletedProcess[str]:
    """C-ECHO (verification) to host:port; returncode 0 when the peer accepted the association and echo."""
    net_timeout = str(max(1, int(timeout)))
    args = [_tool("echoscu"), "-to", net_timeout, "-ta", net_timeout, "-td", net_timeout]
    if verbose:
        args.append("-v")
    args += ["-aet", calling_aet, "-aec", called_aet, *extra_args, host, str(port)]
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=check)
