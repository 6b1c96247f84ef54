"""Every limit of the system, in one place, with the relations between them asserted at
import. Configuration may lower the operational limits; these are the hard bounds."""
from datetime import date as _date

AMOUNT_MIN_CENTS = 1
AMOUNT_MAX_CENTS = 10**15
# A balance may grow past any single amount but must stay far below PostgreSQL's bigint.
BALANCE_MAX_CENTS = 10**17
BIGINT_MAX = 2**63 - 1

NAME_LENGTH_MAX = 200
OWNER_LENGTH_MAX = 200
MEMO_LENGTH_MAX = 500
IDEMPOTENCY_KEY_LENGTH_MAX = 200
ID_LENGTH_MAX = 64
# A presented bearer token longer than this is not looked up.
TOKEN_LENGTH_MAX = 256
AUDIT_PAGE_SIZE_MAX = 1000

PAGE_SIZE_DEFAULT = 50
PAGE_SIZE_MAX = 500

ANALYTICS_WEEKS_MAX = 520
# The earliest day an account or portfolio may say it opened (so every effective date,
# never before its account's opening, is too): older dates are typing mistakes, and
# year 1 made the analytics overflow PostgreSQL's date arithmetic.
OPENED_ON_MIN = _date(1970, 1, 1)

BATCH_SIZE_MAX = 4096
WRITE_QUEUE_MAX = 65536
OPERATIONS_IN_FLIGHT_MAX = 65536
RESIDENT_ACCOUNTS_MAX = 2_000_000
BODY_BYTES_MAX = 1 << 20

assert AMOUNT_MIN_CENTS >= 1
assert AMOUNT_MAX_CENTS < BALANCE_MAX_CENTS
# Even a full batch of maximal credits on one account cannot overflow a bigint.
assert BALANCE_MAX_CENTS + BATCH_SIZE_MAX * AMOUNT_MAX_CENTS < BIGINT_MAX
assert PAGE_SIZE_DEFAULT <= PAGE_SIZE_MAX
assert BATCH_SIZE_MAX <= WRITE_QUEUE_MAX
