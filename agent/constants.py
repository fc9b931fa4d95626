"""Every tunable number podq uses, each with the reason for its value."""

from typing import Final

# A request line longer than this is rejected unread (`line_too_long`): no command podq knows needs more,
# and reading without a bound would let one bad writer exhaust the daemon's memory.
MAX_LINE_BYTES: Final = 1024 * 1024

# Reads of requests.jsonl are done in chunks this size.
READ_CHUNK_BYTES: Final = 64 * 1024

# stdout/stderr kept in a result line; more is cut and flagged `truncated`, so results.jsonl stays tailable.
MAX_OUTPUT_BYTES: Final = 64 * 1024

# OpenSSH's default MaxSessions is 10, but under load it refuses channels well before that; 4 per
# connection was measured safe, and more concurrency comes from more connections.
MAX_CHANNELS_PER_CONNECTION: Final = 4

# Default number of SSH connections per host (so 8 concurrent commands per host by default).
DEFAULT_MAX_CONNECTIONS: Final = 2

# SSH keepalive: a dead link (pod stopped, NAT dropped) is noticed within interval * count seconds.
KEEPALIVE_INTERVAL_S: Final = 15.0
KEEPALIVE_COUNT_MAX: Final = 3

# TCP connect + SSH handshake + auth must finish within this, or the attempt counts as unreachable.
DEFAULT_CONNECT_TIMEOUT_S: Final = 10.0

# Connection-level retries (tenacity): attempts in all, exponential back-off with jitter between them.
DEFAULT_CONNECT_ATTEMPTS: Final = 4
DEFAULT_RETRY_INITIAL_S: Final = 0.5
DEFAULT_RETRY_MAX_S: Final = 8.0

# On SIGINT/SIGTERM the daemon stops reading and gives running commands this long to finish.
DEFAULT_SHUTDOWN_GRACE_S: Final = 10.0

# inotify can drop events when its queue overflows; the daemon re-checks the file this often regardless,
# which bounds the delay in that rare case without making polling the normal path.
SAFETY_RECHECK_S: Final = 5.0

# `podq submit --wait` warns after this long with no `accepted` line (is the daemon running?).
NO_DAEMON_HINT_AFTER_S: Final = 5.0

# Longest request id accepted; ids are written into result lines and file names.
MAX_ID_LENGTH: Final = 128

# Longest path accepted in a request field.
MAX_PATH_LENGTH: Final = 1024
