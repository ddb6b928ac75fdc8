"""The lab's overlap record (overlap.jsonl), the evidence for frozen or moving subspaces: at each
refresh it reports the library's diagnostic for every projected weight, the overlap of the basis
the refresh replaced with the new one (tests/test_subspace.py pins that against our own SVDs).
See docs/testing.md, S14 and H9."""
from lab_helpers import lab_cache, make_cfg, read_jsonl  # noqa: F401
from subspace_lab import train as T
from subspace_optim import subspace_diagnostics


def test_overlap_records_are_the_library_diagnostics_of_each_refresh(tmp_path, lab_cache):
    result = T.train(make_cfg(tmp_path / "o", lab_cache, optim__method="galore", steps=11,
                              optim__update_proj_gap=5))
    records = read_jsonl(tmp_path / "o" / "overlap.jsonl")
    last_step = max(r["step"] for r in records)
    final = {d["name"]: d for d in subspace_diagnostics(result.optimizer)}
    last = {r["name"]: r for r in records if r["step"] == last_step}
    assert last.keys() == final.keys() and len(final) == 14  # 7 linears x 2 layers
    for name, d in final.items():
        assert last[name]["overlap"] == d["overlap"] and last[name]["refresh_count"] == d["refresh_count"]
    overlaps = [r["overlap"] for r in records]
    # GaLore's subspaces move between refreshes on real gradients: not all 1 (a basis compared
    # with itself), and none above 1
    assert min(overlaps) < 0.99 and max(overlaps) <= 1 + 1e-5
