"""Identifiers: a prefix, then 48 bits of milliseconds and 64 random bits in hex, so ids
sort by creation time (cursor pagination by id follows creation order). Ids must be
unique, not secret: the Mersenne Twister is enough and ~10x cheaper than os.urandom."""
import itertools
import random
import time

_op_ids = itertools.count(1)
_random = random.Random()


def new_id(prefix: str) -> str:
    return f"{prefix}_{int(time.time() * 1000):012x}{_random.getrandbits(64):016x}"


def next_op_id() -> int:
    return next(_op_ids)
