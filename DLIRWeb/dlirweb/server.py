"""``dlir-web``: serve the DLIR registration page (trame-slicer) on this machine.

Safe by default: it listens on 127.0.0.1 only (another address is allowed, with a warning that
anyone who can reach the port can use the page); server-side files are offered only under the
folder given with ``--folder``; uploads are size-limited and, like the results, kept in a private
temporary folder (mode 0700) that is removed when the server stops; one registration runs at a
time.  Rendering is off screen (EGL where there is no display).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

DEFAULT_PORT = 8080
DEFAULT_MAX_UPLOAD_MB = 512


def buildParser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dlir-web", description="Serve the DLIR registration page in a browser.")
    parser.add_argument("--folder", type=Path, help="offer the images under this folder (and nothing outside it)")
    parser.add_argument("--models", type=Path, action="append", default=[], metavar="DIR",
                        help="another folder of stacks for the list (besides the bundled and the user's)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0: any free port)")
    parser.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_MB,
                        help=f"largest upload accepted, in MB (default {DEFAULT_MAX_UPLOAD_MB})")
    return parser


def isLoopback(host: str) -> bool:
    """Whether ``host`` is a loopback address or ``localhost``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: Sequence[str] | None = None) -> int:
    args = buildParser().parse_args(argv)
    if not isLoopback(args.host):
        print(f"dlir-web: warning: listening on {args.host}: anyone who can reach port {args.port} can use this page, "
              "read the images under --folder and run registrations", file=sys.stderr)
    if args.folder is not None and not args.folder.is_dir():
        print(f"dlir-web: error: the folder {args.folder} does not exist", file=sys.stderr)
        return 2
    if args.max_upload_mb <= 0:
        print("dlir-web: error: --max-upload-mb must be above 0", file=sys.stderr)
        return 2
    if not os.environ.get("DISPLAY"):
        os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
    sys.argv = sys.argv[:1]  # trame parses the command line too: ours is parsed already
    with tempfile.TemporaryDirectory(prefix="dlir-web-") as private:
        serve(args, Path(private))
    return 0


def serve(args: argparse.Namespace, private: Path) -> None:
    """Build the page over ``private`` (uploads/, results/) and serve it until stopped."""
    from trame.app import get_server

    from DLIRRegistrationLib.samplepair import sampleDataFolder

    from .inputs import InputFiles
    from .page import RegistrationPage

    uploads, results = private / "uploads", private / "results"
    uploads.mkdir(mode=0o700)
    results.mkdir(mode=0o700)
    files = InputFiles(sampleDataFolder(), args.folder, uploads, int(args.max_upload_mb * 2**20))
    os.environ["TRAME_WS_MAX_MSG_SIZE"] = str(int(args.max_upload_mb * 2**20) + 2**20)  # an upload fits in a message
    server = get_server(client_type="vue3")
    RegistrationPage(server, files, results, tuple(args.models))
    print(f"dlir-web: serving on http://{args.host}:{args.port}/ ; uploads and results in {private} "
          "(removed when the server stops)", flush=True)
    server.start(host=args.host, port=args.port, open_browser=False, timeout=0, show_connection_info=False)


if __name__ == "__main__":
    sys.exit(main())
