"""`Engine` is a facade (decision 86): every public method of a part is `Engine`'s, and
the engine hands it to the part's own bound method, without a call of its own."""
import inspect

from actors.api import Engine, _Part
from actors.money import Money
from actors.portfolios import Portfolios
from actors.queries import Queries
from actors.settings import load_settings

PARTS = {"money": Money, "portfolios": Portfolios, "queries": Queries}
# Called by other parts, not by the engine's users.
BETWEEN_PARTS = {"merge_due", "after_credit", "schedule_reinvestment"}


def test_every_public_method_of_a_part_is_the_engines():
    for attribute, cls in PARTS.items():
        public = {name for name, member in vars(cls).items()
                  if inspect.isfunction(member) and not name.startswith("_")} - BETWEEN_PARTS
        assert public, cls
        for name in public:
            declared = Engine.__dict__.get(name)
            assert isinstance(declared, _Part), f"Engine.{name} is not declared as {cls.__name__}'s"
            assert (declared.part, declared.cls) == (attribute, cls)


def test_the_engine_hands_a_call_to_its_parts_bound_method():
    engine = Engine(load_settings({}, {"database": {"url": "postgresql://unused/none"}}))
    assert engine.transfer == engine.money.transfer
    assert engine.get_account == engine.queries.get_account
    assert engine.fork == engine.portfolios.fork
    # Looked up once: afterwards the engine's own attribute, as cheap as a method.
    assert engine.__dict__["transfer"] == engine.money.transfer
    assert inspect.iscoroutinefunction(engine.deposit)
    assert "Money.transfer" in Engine.transfer.__doc__
