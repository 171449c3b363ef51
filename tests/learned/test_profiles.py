"""The profiles file: readable (profiles first, accuracies written out), round-trips, and
extends rather than double-counts."""

import json

from coe.learned.profiles import AggregatorProfile, ExpertProfile, Profiles


def test_profiles_file_reads_from_the_top_and_round_trips(tmp_path):
    prof = Profiles(skill_source="vocabulary", questions=[str(i) for i in range(500)])
    e = prof.experts.setdefault("alpha", ExpertProfile())
    e.add({"algebra": 1.0}, True)
    e.add({"algebra": 0.5, "contract law": 0.5}, False)
    e.add({"contract law": 1.0}, False)
    prof.aggregators["alpha"] = AggregatorProfile(correct=2, total=3)
    path = tmp_path / "profiles.json"
    prof.save(path)
    text = path.read_text()
    lines = text.splitlines()
    assert lines[-2].startswith(' "questions": ["0", "1"') and len(lines) < 40  # ids on one line, last
    data = json.loads(text)
    assert list(data) == ["version", "skill_source", "experts", "aggregators", "record", "selector",
                          "questions"]
    assert data["experts"]["alpha"]["skills"] == {"algebra": 0.5, "contract law": -1.5}
    assert data["experts"]["alpha"]["accuracy"] == 1 / 3
    assert data["aggregators"]["alpha"]["accuracy"] == 2 / 3
    again = Profiles.load(path)  # the written-out accuracies are ignored on load
    assert again.model_dump() == prof.model_dump() and again.experts["alpha"].accuracy == prof.experts["alpha"].accuracy
