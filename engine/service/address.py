"""Where the engine server may listen, who may reach it, and how the traffic is protected.

Local by default: an ipc socket in a per-user directory created owner-only, or tcp on a loopback
host. An address reachable from other machines needs an auth token, since the engine would
otherwise run anyone's requests. Beyond a trusted network, ZeroMQ's CURVE encrypts the traffic
(token and images included) and lets clients pin the server's public key: `stepweave keygen`
writes the key pair as ZeroMQ certificate files.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import stat
import tempfile
from pathlib import Path

import zmq
import zmq.auth
import zmq.utils.z85


def default_address() -> str:
    """Where server and clients meet unless told otherwise: an ipc socket in a per-user
    directory (the server creates it owner-only), so nothing is reachable from the network."""
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return f"ipc://{base}/stepweave-{os.getuid()}/engine.sock"


MIN_REMOTE_TOKEN_CHARS = 16


def check_bind_address(address: str, auth_token: str | None) -> bool:
    """Only local addresses may be served without a token: ipc, or tcp on a loopback host.
    Anything reachable from other machines (a routable IP, a host name, `*`) needs one.
    Returns whether the address is local."""
    scheme, sep, rest = address.partition("://")
    if not sep or not rest:
        raise ValueError(f"address must be ipc://PATH or tcp://HOST:PORT, got {address!r}")
    if scheme == "ipc":
        return True
    if scheme != "tcp":
        raise ValueError(f"address must use ipc:// or tcp://, got {address!r}")
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not (port == "*" or (port.isdigit() and 0 < int(port) < 65536)):
        raise ValueError(f"tcp address must be tcp://HOST:PORT (PORT may be *), got {address!r}")
    if _is_loopback(host.strip("[]")):
        return True
    if not auth_token or len(auth_token) < MIN_REMOTE_TOKEN_CHARS:
        raise ValueError(
            f"binding {address} exposes the engine beyond this machine; pass --auth-token with at least "
            f"{MIN_REMOTE_TOKEN_CHARS} characters (clients present it), or bind ipc:// or tcp://127.0.0.1"
        )
    return False


def claim_ipc_path(address: str) -> None:
    """Make an ipc address ready to bind. zmq's ipc bind silently replaces an existing socket
    file, which would cut a running server off from its clients: refuse when one answers there,
    clear a stale socket file. The default directory must be private to this user."""
    path = Path(address[len("ipc://") :])
    if address == default_address():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = path.parent.stat()
        if info.st_uid != os.getuid() or info.st_mode & 0o077:
            raise ValueError(f"{path.parent} must belong to this user with mode 0700 (it holds the server's socket)")
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ValueError(f"cannot serve on {address}: {path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:  # nobody listening: a stale file from a server that died
            path.unlink(missing_ok=True)
            return
    raise ValueError(f"cannot serve on {address}: another server is running there")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host or interface name: may resolve to anything
        return False


def write_server_keys(directory: str | Path) -> tuple[Path, Path]:
    """A new CURVE key pair: (public certificate for clients, secret certificate, owner-only)."""
    if not zmq.has("curve"):
        raise ValueError("this libzmq build has no CURVE support")
    directory = Path(directory)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    public, secret = (Path(p) for p in zmq.auth.create_certificates(directory, "server"))
    secret.chmod(0o600)
    return public, secret


def load_server_keys(path: str | Path) -> tuple[bytes, bytes]:
    """The server's (public, secret) key from a secret certificate file."""
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the CURVE secret key file {str(path)!r}: {exc}") from None
    if secret is None:
        raise ValueError(
            f"{str(path)!r} holds only a public key; the server needs the secret certificate (server.key_secret)"
        )
    return public, secret


def load_public_key(key: str | bytes | Path) -> bytes:
    """A server's public key as a client gives it: 40 Z85 characters, or a certificate file."""
    text = key.decode() if isinstance(key, bytes) else str(key)
    if len(text) == 40 and not Path(text).exists():
        try:
            zmq.utils.z85.decode(text)
        except (ValueError, KeyError, IndexError) as exc:
            raise ValueError(f"server_key is not a Z85 CURVE public key: {exc}") from None
        return text.encode()
    try:
        public, _ = zmq.auth.load_certificate(text)
    except (OSError, ValueError) as exc:
        raise ValueError(f"server_key must be a 40-character Z85 public key or a certificate file; {exc}") from None
    return public


def ipc_path(address: str) -> Path | None:
    return Path(address[len("ipc://") :]) if address.startswith("ipc://") else None


def bind_local(sock: zmq.Socket, address: str) -> str:
    """Bind `sock`; an ipc socket file is claimed first and created owner-only (no window in
    which another user could connect). Returns the bound endpoint."""
    path = ipc_path(address)
    if path is None:
        sock.bind(address)
    else:
        claim_ipc_path(address)
        old = os.umask(0o177)
        try:
            sock.bind(address)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)


def remove_ipc_file(address: str) -> None:
    path = ipc_path(address)
    if path is not None:
        try:
            path.unlink()
        except OSError:
            pass
