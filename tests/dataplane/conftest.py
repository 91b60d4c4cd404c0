import pytest

from .harness import Rig


@pytest.fixture
def make_rig():
    """Factory: make_rig(**kw) -> Rig; after the test every rig's guest RAM must
    match the canary model and the rig is closed."""
    rigs = []

    def factory(**kw):
        r = Rig(**kw)
        rigs.append(r)
        return r

    yield factory
    try:
        for r in rigs:
            for g in r.gq:
                r.mem.accept(g.used, 6 + 8 * g.num)   # the used ring is checked by the tests
            r.mem.check()
    finally:
        for r in rigs:
            r.close()
