"""A real Postfix MTA for tests: a private instance on a loopback port, delivering to Maildirs.

``require_postfix()`` finds ``/usr/sbin/postfix`` and, when it is missing and the process
may install packages (root), installs Debian's ``postfix`` with debconf preseeded to
"No configuration": nothing is written to ``/etc/postfix/main.cf`` and no system MTA is
started. Where that cannot be done it skips the test and says why.

The instance is Postfix's own ``postfix -c DIR start``: a ``main.cf`` and ``master.cf``
of its own in DIR, its queue, data directory and log file beside them, smtpd on
``127.0.0.1:<free port>`` only, STARTTLS offered with a self-signed certificate for
``mail.example.test``. The system instance (``/etc/postfix``, ``/var/spool/postfix``) is
neither read for settings, changed nor started. ``alternate_config_directories`` is not
needed: only the set-gid commands (``postqueue``, ``postdrop``) check it, and we use
neither (mail arrives over SMTP). Mail to ``example.test`` is delivered by the
``virtual`` agent into Maildirs (``admin@example.test`` in ``<root>/mail/admin/``); any
other recipient there is refused at RCPT with 550.

Fixtures (loaded by ``tests/conftest.py``): ``postfix_instance``, one instance per test
module, and ``postfix``, the same instance with its mailboxes emptied for the test.
"""

from __future__ import annotations

import email
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from email.policy import default
from pathlib import Path

import pytest

from tests.support.debian import apt_install
from tests.support.prefect_api import free_port
from tests.support.smtp import self_signed_cert

POSTFIX = "/usr/sbin/postfix"
DOMAIN = "example.test"
SERVER_NAME = f"mail.{DOMAIN}"
MAILBOXES = ("admin",)  # the known users of DOMAIN; anyone else gets 550 at RCPT
NO_SYSTEM_MTA = "postfix postfix/main_mailer_type select No configuration\n"


def require_postfix() -> str:
    """The path of the ``postfix`` command, installed when missing; skips when it cannot be."""
    if not Path(POSTFIX).exists():
        problem = apt_install("postfix", debconf=NO_SYSTEM_MTA, recommends=False)
        if problem is not None or not Path(POSTFIX).exists():
            pytest.skip(f"Postfix unavailable: {problem or 'not at ' + POSTFIX}")
    return POSTFIX


# The Debian package's master.cf services, with every chroot column "n" (no jail to
# populate) and smtpd on a loopback port of the instance's own instead of port 25.
MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup     unix  n - n 60    1 pickup
cleanup    unix  n - n -     0 cleanup
qmgr       unix  n - n 300   1 qmgr
tlsmgr     unix  - - n 1000? 1 tlsmgr
rewrite    unix  - - n -     - trivial-rewrite
bounce     unix  - - n -     0 bounce
defer      unix  - - n -     0 bounce
trace      unix  - - n -     0 bounce
verify     unix  - - n -     1 verify
flush      unix  n - n 1000? 0 flush
proxymap   unix  - - n -     - proxymap
proxywrite unix  - - n -     1 proxymap
smtp       unix  - - n -     - smtp
relay      unix  - - n -     - smtp
showq      unix  n - n -     - showq
error      unix  - - n -     - error
retry      unix  - - n -     - error
discard    unix  - - n -     - discard
local      unix  - n n -     - local
virtual    unix  - n n -     - virtual
lmtp       unix  - - n -     - lmtp
anvil      unix  - - n -     1 anvil
scache     unix  - - n -     1 scache
postlog    unix-dgram n - n - 1 postlogd
"""


def _main_cf(root: Path, *, cert: Path, key: Path) -> str:
    mail_user = pwd.getpwnam("nobody")
    settings = {
        "compatibility_level": "3.6",
        "queue_directory": root / "queue",
        "data_directory": root / "data",
        "maillog_file": root / "maillog",  # no syslog needed; read when a test fails
        "maillog_file_prefixes": root,
        "myhostname": SERVER_NAME,
        "inet_interfaces": "loopback-only",
        "inet_protocols": "ipv4",
        "mydestination": "",
        "mynetworks": "127.0.0.0/8",
        "relayhost": "",
        "alias_maps": "",
        "alias_database": "",
        # Add no Date: or Message-ID: of Postfix's own: the ones received are the app's.
        "local_header_rewrite_clients": "",
        "virtual_mailbox_domains": DOMAIN,
        "virtual_mailbox_base": root / "mail",
        "virtual_mailbox_maps": f"texthash:{root / 'conf' / 'mailboxes'}",
        "virtual_uid_maps": f"static:{mail_user.pw_uid}",
        "virtual_gid_maps": f"static:{mail_user.pw_gid}",
        "smtpd_reject_unlisted_recipient": "yes",
        "smtpd_tls_cert_file": cert,
        "smtpd_tls_key_file": key,
        "smtpd_tls_security_level": "may",
    }
    return "".join(f"{name} = {value}\n" for name, value in settings.items())


@dataclass(frozen=True)
class Postfix:
    """A running private instance: where it listens, its certificate, its Maildirs."""

    root: Path
    port: int
    cert: Path  # self-signed for ``server_name``: the CA file a client must trust
    host: str = "127.0.0.1"
    server_name: str = SERVER_NAME

    @property
    def config_dir(self) -> Path:
        return self.root / "conf"

    def mailbox(self, user: str) -> list[EmailMessage]:
        """The messages delivered to ``user@example.test``, oldest first."""
        folder = self.root / "mail" / user
        files = sorted(
            (f for sub in ("new", "cur") for f in (folder / sub).glob("*")),
            key=lambda f: f.stat().st_mtime,
        )
        return [_parsed(f.read_bytes()) for f in files]

    def wait_for_mail(self, user: str, *, count: int, timeout: float = 60) -> list[EmailMessage]:
        """``user``'s messages once there are ``count`` (fails the test at ``timeout``)."""
        deadline = time.monotonic() + timeout
        while len(messages := self.mailbox(user)) < count:
            if time.monotonic() > deadline:
                pytest.fail(
                    f"{len(messages)} of {count} messages in {user}'s Maildir after "
                    f"{timeout} s; Postfix's log:\n{self.log_tail()}"
                )
            time.sleep(0.2)
        return messages

    def empty_mailboxes(self) -> None:
        # The virtual agent creates a Maildir again at the next delivery.
        for user in MAILBOXES:
            shutil.rmtree(self.root / "mail" / user, ignore_errors=True)

    def log_tail(self, lines: int = 40) -> str:
        log = self.root / "maillog"
        return "\n".join(log.read_text().splitlines()[-lines:]) if log.exists() else "(no log)"

    def postfix(self, action: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [POSTFIX, "-c", str(self.config_dir), action],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )


def _parsed(data: bytes) -> EmailMessage:
    message = email.message_from_bytes(data, policy=default)
    assert isinstance(message, EmailMessage)
    return message


def _configure(root: Path) -> Postfix:
    """Write the instance's configuration under ``root``; nothing is started."""
    conf = root / "conf"
    conf.mkdir()
    cert, key = self_signed_cert(conf, name=SERVER_NAME)
    port = free_port()
    (conf / "main.cf").write_text(_main_cf(root, cert=cert, key=key))
    (conf / "master.cf").write_text(MASTER_CF.format(port=port))
    (conf / "mailboxes").write_text("".join(f"{u}@{DOMAIN} {u}/\n" for u in MAILBOXES))
    (root / "queue").mkdir()  # root's; ``postfix check`` makes its subfolders and data/
    mail = root / "mail"
    mail.mkdir()
    nobody = pwd.getpwnam("nobody")
    os.chown(mail, nobody.pw_uid, nobody.pw_gid)  # the virtual agent delivers as nobody
    return Postfix(root, port, cert)


def _start(instance: Postfix) -> None:
    """``postfix check`` then ``postfix start``; returns once smtpd accepts connections."""
    for action in ("check", "start"):
        done = instance.postfix(action)
        if done.returncode != 0:
            pytest.fail(f"postfix {action} failed:\n{done.stderr}\n{instance.log_tail()}")
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection((instance.host, instance.port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                pytest.fail(f"Postfix does not listen on {instance.port}:\n{instance.log_tail()}")
            time.sleep(0.1)


@pytest.fixture(scope="module")
def postfix_instance() -> Iterator[Postfix]:
    """A private Postfix instance for the test module, stopped and removed at its end."""
    require_postfix()
    # Not under pytest's tmp_path: its folders are 0700 root, and Postfix's daemons
    # (user postfix) and its virtual agent (user nobody) must reach their folders.
    root = Path(tempfile.mkdtemp(prefix="backjobs-postfix-"))
    root.chmod(0o755)
    try:
        instance = _configure(root)
        try:
            _start(instance)
            yield instance
        finally:
            instance.postfix("stop")
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postfix(postfix_instance: Postfix) -> Postfix:
    """The module's Postfix instance, its mailboxes empty."""
    postfix_instance.empty_mailboxes()
    return postfix_instance
