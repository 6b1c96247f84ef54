"""The writer's answers after a commit (`persistence.writer.Writer._deliver`): in commit
order, whatever a continuation does. No database: the deliveries are queued directly."""
from __future__ import annotations

from actors.ids import next_op_id
from engine.errors import Overloaded
from persistence.writer import Writer, WriteOp


def _writer() -> Writer:
    return Writer(None, batch_size_max=8, queue_max=1, notify=lambda resolutions: None)


def _op(order: list, name: str, then=None) -> WriteOp:
    def done(result, error):
        order.append((name, "ok" if error is None else type(error).__name__))
        if then is not None:
            then()
    return WriteOp(op_id=next_op_id(), accounts=(), done=done)


def test_a_refusal_raised_while_answering_does_not_answer_a_later_batch_first():
    """An answer can make an actor submit; a refused submission is failed at once. The
    batch committed after the one being answered still waits its turn."""
    order: list = []
    writer = _writer()
    refused = _op(order, "refused")
    first = _op(order, "a1", then=lambda: writer._fail([refused], Overloaded("the write queue is full")))
    writer._deliveries.extend([({}, [first, _op(order, "a2")]), ({}, [_op(order, "b1")])])
    writer._deliver()
    assert order == [("a1", "ok"), ("refused", "Overloaded"), ("a2", "ok"), ("b1", "ok")]
    assert not writer._deliveries


def test_a_continuation_that_raises_strands_nothing_behind_it():
    order: list = []
    writer = _writer()

    def boom():
        raise RuntimeError("a bug in a continuation")

    writer._deliveries.extend([({}, [_op(order, "a1", then=boom), _op(order, "a2")]), ({}, [_op(order, "b1")])])
    writer._deliver()
    assert order == [("a1", "ok"), ("a2", "ok"), ("b1", "ok")]


def test_a_batch_that_cannot_be_built_ahead_waits_again_in_order(monkeypatch):
    """Building ahead is an optimization: a batch that fails to build (a bug) goes back to
    the front of the queue, in order, to be built again in its turn (where its failure
    is answered), and no batch is built ahead again until the next statement is sent."""
    import types

    from persistence import writer as writer_module

    order: list = []
    writer = Writer(None, batch_size_max=4, queue_max=100, notify=lambda resolutions: None)
    ops = [_op(order, f"op{n}") for n in range(6)]
    writer._waiting.extend(ops)
    writer._sending = types.SimpleNamespace(serial=1, head=(0, "genesis"), event_head=0)   # a statement in flight

    def broken(*args, **kwargs):
        raise RuntimeError("a bug while building")

    monkeypatch.setattr(writer_module._Batch, "of", broken)
    writer._build_ahead()
    assert list(writer._waiting) == ops
    assert writer._ahead is None and writer._sending is None and writer.built_ahead == 0
    assert order == []   # nobody answered: the batch is built again in its turn
