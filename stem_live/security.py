"""ZeroMQ CURVE security: key files, and which endpoints need them (anything but loopback).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# ----------------------------------------------------------------------------- security
# Binding anything but loopback requires ZeroMQ CURVE keys. The instrument side is the CURVE
# server (own key pair + a folder of allowed engine public keys); an engine is a client (own
# key pair + the instrument's public key). A peer without an allowed key completes no
# handshake: it can neither read a frame nor send a correction. Key files are ZeroMQ
# certificates: NAME.key (public, give it to the other side) and NAME.key_secret (keep it).


class KeyFileError(ValueError):
    """A key file or folder is missing or unreadable; the message says which."""


def is_loopback(endpoint: str) -> bool:
    """True for ``tcp://127.x.x.x:port``, ``tcp://localhost:port``, ``tcp://[::1]:port``, ipc and inproc."""
    import ipaddress
    from urllib.parse import urlparse

    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    try:
        host = urlparse(endpoint).hostname or ""
    except ValueError:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def make_keys(folder: Any, name: str) -> tuple[str, str]:
    """Create ``folder/NAME.key`` and ``folder/NAME.key_secret`` (mode 600); returns their paths."""
    import os

    import zmq.auth

    os.makedirs(folder, exist_ok=True)
    public, secret = zmq.auth.create_certificates(str(folder), name)
    os.chmod(secret, 0o600)
    return str(public), str(secret)


def _load_key(path: Any, *, secret: bool) -> tuple[bytes, bytes | None]:
    import zmq.auth

    try:
        pub, sec = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc}") from None
    if secret and sec is None:
        raise KeyFileError(f"{path} holds no secret key: give the NAME.key_secret file")
    return pub, sec


@dataclass(frozen=True)
class ServerKeys:
    """Instrument side of CURVE: own secret key file, folder of allowed client public keys."""

    secret_file: str
    allowed_dir: str

    def apply(self, socket: Any) -> None:
        pub, sec = _load_key(self.secret_file, secret=True)
        socket.curve_secretkey = sec
        socket.curve_publickey = pub
        socket.curve_server = True

    def start_authenticator(self, context: Any) -> Any:
        """Start ZAP on ``context`` so that only keys in ``allowed_dir`` get in; stop it when done."""
        import os

        from zmq.auth.thread import ThreadAuthenticator

        if not os.path.isdir(self.allowed_dir):
            raise KeyFileError(f"allowed-keys folder {self.allowed_dir} does not exist")
        auth = ThreadAuthenticator(context)
        auth.start()
        auth.configure_curve(domain="*", location=str(self.allowed_dir))
        return auth


@dataclass(frozen=True)
class ClientKeys:
    """Engine side of CURVE: own secret key file and the instrument's public key file."""

    secret_file: str
    server_public_file: str

    def apply(self, socket: Any) -> None:
        pub, sec = _load_key(self.secret_file, secret=True)
        server_pub, _ = _load_key(self.server_public_file, secret=False)
        socket.curve_secretkey = sec
        socket.curve_publickey = pub
        socket.curve_serverkey = server_pub
