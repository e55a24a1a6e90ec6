"""Every error the agent can raise, in one place.

Errors that reach a proxy client carry the wire code and HTTP status of
DESIGN.md's table, so the data plane renders them without a lookup table of
its own. Errors that stay local (vault, identity, config) carry only a
sentence fit to show a user as it is.
"""

from __future__ import annotations


class AgentError(Exception):
    """Base of every error the agent raises on purpose."""

    #: One clear sentence a user can act on; subclasses may refine it.
    default_message = "mtls-agent failed."

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or self.default_message)

    @property
    def message(self) -> str:
        return str(self)


# --- errors answered on the proxy socket (DESIGN.md, "The two sockets") ---


class ProxyError(AgentError):
    """An error the agent itself answers to a proxy client."""

    status = 500
    code = "internal-error"


class NoIdentityForHost(ProxyError):
    """No identity is bound to the requested host."""

    status = 403
    code = "no-identity-for-host"


class IdentityExpired(ProxyError):
    """The identity bound to the host has expired."""

    status = 403
    code = "identity-expired"


class Locked(ProxyError):
    """The agent is locked; `agentctl unlock` loads the identities."""

    status = 423
    code = "locked"
    default_message = "The agent is locked; run 'agentctl unlock' first."


class UpstreamUntrusted(ProxyError):
    """The upstream's certificate failed verification."""

    status = 502
    code = "upstream-untrusted"


class PinMismatch(ProxyError):
    """The upstream's public key matches none of the identity's pins."""

    status = 502
    code = "pin-mismatch"


class UpstreamUnreachable(ProxyError):
    """The upstream refused, reset, failed the handshake or did not resolve."""

    status = 502
    code = "upstream-unreachable"


class UpstreamTimeout(ProxyError):
    """The upstream did not connect or answer in time."""

    status = 504
    code = "upstream-timeout"


class UpstreamBadResponse(ProxyError):
    """The upstream answered something that is not valid HTTP/1.1."""

    status = 502
    code = "upstream-bad-response"


class BadRequest(ProxyError):
    """The client's request is malformed or ambiguous."""

    status = 400
    code = "bad-request"


class UriTooLong(BadRequest):
    """The request line is longer than the configured limit."""

    status = 414


class HeadersTooLarge(BadRequest):
    """The header block has too many bytes or too many fields."""

    status = 431


class PeerDenied(ProxyError):
    """The calling process is not allowed to use the agent or the identity."""

    status = 403
    code = "peer-denied"
    default_message = "This process is not allowed to use the agent."

    def __init__(self, message: str | None = None, *, reason: str | None = None) -> None:
        super().__init__(message)
        #: Which rule refused the caller: for the audit log, never for the response.
        self.reason = reason


# --- why an answer was cut off: written to the audit log, never answered ---


class Cut(ProxyError):
    """An exchange that ended with neither a whole answer nor an error answer:
    the connection was closed or aborted. Only its audit line says why, with
    status 0 when no answer had begun."""

    status = 0


class ClientGone(Cut):
    """The caller closed its connection before its answer was whole."""

    code = "client-gone"


class ClientStalled(Cut):
    """The caller stopped sending its body, or reading the answer, for the body's idle time."""

    code = "client-timeout"


class UpstreamCut(Cut):
    """The upstream reset or closed its connection in the middle of the answer's body."""

    code = "upstream-cut"


# --- errors that stay on this machine ---


class ConfigError(AgentError):
    """config.toml is unreadable or holds an invalid setting."""


class IdentityError(AgentError):
    """An identity or its input (PKCS#12, PEM, host pattern) is unusable."""


class VaultError(AgentError):
    """The vault is missing, corrupt, foreign or cannot be written."""


class VaultBusy(VaultError):
    """Another writer held the vault lock for longer than the wait allows."""

    default_message = "vault busy: another agentctl is writing to it; try again."


class BadPassphrase(VaultError):
    """The passphrase does not open the vault."""

    default_message = "Wrong passphrase."


class AgentNotRunning(AgentError):
    """No agent answers on the control socket."""


class KeyringError(AgentError):
    """The OS keyring is missing, insecure, locked or out of reach (unlock --remember)."""


class AuditLogError(AgentError):
    """The audit log cannot be opened or is not the user's own."""


class AttestationError(AgentError):
    """A caller's executable could not be proven: the process is gone, its pid
    was reused, or its program cannot be read. Caller rules then refuse."""


class EnrollmentError(AgentError):
    """Enrollment or renewal failed: the server was unreachable or untrusted,
    refused, or answered something that cannot become this identity."""


class EnrollmentPending(EnrollmentError):
    """The EST server accepted the request but had not issued the certificate
    within the time allowed; asking again later with the same CSR resumes it."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        #: Seconds the server asked us to wait before asking again.
        self.retry_after = retry_after
