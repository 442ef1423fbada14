import csv
import re

from ftkit.core.config import RulesConfig
from ftkit.data.demo_data import ORDER_PATTERN, SIGN_OFF, generate, write_csv
from ftkit.evaluate.rules import check_rules

HOUSE = RulesConfig(max_sentences=3, ignore_for_sentences=[SIGN_OFF], required_phrases=[SIGN_OFF],
                    echo_pattern=ORDER_PATTERN)


def test_deterministic_bytes(tmp_path):
    a, b = write_csv(tmp_path / "a.csv", 300, 7), write_csv(tmp_path / "b.csv", 300, 7)
    assert a.read_bytes() == b.read_bytes()
    assert write_csv(tmp_path / "c.csv", 300, 8).read_bytes() != a.read_bytes()


def test_every_written_reply_is_in_house_voice():
    rows = generate(1000, 0)
    assert 1000 <= len(rows) <= 1030
    replies = [r for r in rows if r["reply"].strip()]
    assert len(rows) - len(replies) >= 3  # some rows have no reply (quarantined in stage 01)
    for r in replies:
        res = check_rules(r["reply"], r["ticket"], HOUSE)
        assert res.passed, (r, res.failures)


def test_variety_and_multi_turn(tmp_path):
    rows = generate(1000, 0)
    assert len({r["ticket"].strip() for r in rows}) > 800
    assert sum(1 for r in rows if r["turn"] == 2) > 80
    with_order = [r for r in rows if re.search(ORDER_PATTERN, r["ticket"])]
    assert 0.3 < len(with_order) / len(rows) < 0.8
    path = write_csv(tmp_path / "d.csv", 100, 0)
    with open(path, newline="") as f:
        assert next(csv.reader(f)) == ["conversation_id", "turn", "channel", "ticket", "reply"]
