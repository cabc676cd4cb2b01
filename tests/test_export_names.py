"""Named exports (``-x NAME``): same answers as qemu-nbd under the name, refusal of other names."""

from __future__ import annotations

import json

from servers import assert_same, compare_image, our_nbd, qemu_nbd, run


def test_named_export_matches_qemu_nbd(case_image, tmp_path):
    image = case_image("chain-19.3")
    cmp = compare_image(image, tmp_path / "cmp", map_=False, nbd=True, export="disk-1")
    assert_same(cmp, "export named disk-1: python -m nbdserver vs qemu-nbd")


def test_wrong_export_name_refused_and_list_agrees(case_image, tmp_path):
    image = case_image("types-v3")
    with (
        qemu_nbd(image, tmp_path / "q", export="vol") as ref,
        our_nbd(image, tmp_path / "o", export="vol") as ours,
    ):
        problems = []
        for srv in (ref, ours):
            bad = f"nbd+unix:///other?socket={srv.sock}"
            r = run(["nbdinfo", "--size", bad], tmp_path)
            if r.rc == 0:
                problems.append(f"{srv.name} served export 'other': {r.out.strip()}")
        listed = {}
        for srv in (ref, ours):
            r = run(["nbdinfo", "--json", "--list", srv.uri], tmp_path)
            if r.rc != 0:
                problems.append(f"{srv.name}: nbdinfo --list failed: {r.err.strip()}")
                continue
            exports = json.loads(r.out)["exports"]
            listed[srv.name] = sorted((e["export-name"], e.get("export-size")) for e in exports)
        if len(listed) == 2 and listed["qemu-nbd"] != listed["ours"]:
            problems.append(f"export lists differ: qemu-nbd {listed['qemu-nbd']} ours {listed['ours']}")
        assert not problems, "\n".join(problems) + "\n--- ours stderr:\n" + ours.stderr()
