"""Identifiers: a prefix, then 48 bits of milliseconds and 64 random bits in hex, so ids
sort by creation time (cursor pagination by id follows creation order). Ids must be
unique, not secret: the Mersenne Twister is enough and ~10x cheaper than os.urandom."""
import itertools
import random
import time

_op_ids = itertools.count(1)
_random = random.Random()


def new_id(prefix: str, _time=time.time, _bits=_random.getrandbits) -> str:
    return "%s_%012x%016x" % (prefix, int(_time() * 1000), _bits(64))


def next_op_id() -> int:
    return next(_op_ids)


def new_request_id(_bits=_random.getrandbits) -> str:
    """A request id (32 hex digits, like a uuid's) where the client sent none."""
    return "%032x" % _bits(128)
