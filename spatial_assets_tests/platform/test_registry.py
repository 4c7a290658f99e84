"""Ids, the references manifest and the landing-area scan (the sensors' view of storage)."""

import pytest

from spatial_assets.core.ids import InvalidIdError, validate_id
from spatial_assets.platform.manifest import (
    ManifestError,
    ReferenceEntry,
    dump_manifest,
    merged_target_proportions,
    parse_manifest,
    parse_manifest_entries,
)
from spatial_assets.platform.registry import scan_landing
from spatial_assets.storage.stores import LocalStore


@pytest.mark.parametrize("good", ["poa", "poa_bregma_0.21", "S-001", "a" * 128])
def test_valid_ids(good):
    assert validate_id(good, "sample id") == good


@pytest.mark.parametrize(
    "bad, reason",
    [("a/b", "path separator"), ("a\\b", "path separator"), ("..", "'..'"), ("x..y", "'..'"), ("a,b", "comma"),
     ("", "must start"), (".hidden", "must start"), ("a b", "must start"), ("a" * 129, "max 128")],
)
def test_invalid_ids_say_why(bad, reason):
    with pytest.raises(InvalidIdError, match="sample id") as exc:
        validate_id(bad, "sample id")
    assert reason in str(exc.value)


def test_manifest_round_trip_and_errors():
    entries = [
        ReferenceEntry(id="a", uri="s3://b/a.h5ad", label_column="cell_type", target_proportions={"B cell": 0.1},
                       placeholder_labels=["Ambiguous"]),
        ReferenceEntry(id="b", uri="/data/b.h5ad", label_column="label"),
    ]
    assert parse_manifest(dump_manifest(entries)) == entries
    assert merged_target_proportions(entries) == {"B cell": 0.1}
    with pytest.raises(ManifestError, match=r"duplicate reference id 'a' \(references\[0\], references\[1\]\)"):
        parse_manifest("references:\n- {id: a, uri: x, label_column: c}\n- {id: a, uri: y, label_column: c}\n")
    with pytest.raises(ManifestError, match=r"references\[0\].*missing or empty 'label_column'"):
        parse_manifest("references:\n- {id: a, uri: x}\n")
    with pytest.raises(ManifestError, match="path separator"):
        parse_manifest("references:\n- {id: ../a, uri: x, label_column: c}\n")
    with pytest.raises(ManifestError, match="unknown field"):
        parse_manifest("references:\n- {id: a, uri: x, label_column: c, lable: y}\n")
    conflicting = [ReferenceEntry("a", "x", "c", target_proportions={"T": 0.1}),
                   ReferenceEntry("b", "y", "c", target_proportions={"T": 0.2})]
    with pytest.raises(ManifestError, match="'T'"):
        merged_target_proportions(conflicting)


MIXED = """references:
  - id: good
    uri: s3://b/good.h5ad
    label_column: cell_type
  - id: broken_yaml
    uri: s3://b/y.h5ad
    label_column: [unclosed
  - id: on_gcs
    uri: gs://b/z.h5ad
    label_column: cell_type
  - id: dup
    uri: /data/a.h5ad
    label_column: cell_type
  - {id: dup, uri: /data/b.h5ad, label_column: cell_type}
  - id: local
    uri: /data/local.h5ad
    label_column: cell_type
"""


def test_manifest_errors_are_per_entry_and_the_valid_entries_are_kept():
    parsed = parse_manifest_entries(MIXED, "m.yaml")
    assert [e.id for e in parsed.entries] == ["good", "local"]
    assert parsed.problems == [
        "m.yaml: references[1] (id 'broken_yaml'): not valid YAML: " + parsed.problems[0].split("not valid YAML: ", 1)[1],
        "m.yaml: references[2] (id 'on_gcs'): unknown URI scheme 'gs' in 'gs://b/z.h5ad' (supported: s3://, or a local path)",
        "m.yaml: duplicate reference id 'dup' (references[3], references[4]): none of them is used until one is removed",
    ]
    assert "line 3" in parsed.problems[0]  # where in the entry the YAML breaks
    # every id the manifest names is claimed (their partitions are kept), and it could be read entirely
    assert parsed.mentioned_ids == {"good", "broken_yaml", "on_gcs", "dup", "local"} and parsed.complete
    # the strict parse (for writers) names every problem at once
    with pytest.raises(ManifestError) as exc:
        parse_manifest(MIXED, "m.yaml")
    assert all(p in str(exc.value) for p in parsed.problems)


@pytest.mark.parametrize(
    "text, reason",
    [("references: [\n", "not valid YAML"),  # cannot be split into entries
     ("references:\n  - uri: /x.h5ad\n    label_column: c\n", "missing or empty 'id'"),  # an entry without its id
     ("- just a list\n", "expected a mapping with a 'references' list")],
)
def test_manifest_that_cannot_say_which_ids_it_lists_is_not_complete(text, reason):
    parsed = parse_manifest_entries(text, "m.yaml")
    assert not parsed.complete and parsed.entries == []
    assert reason in " ".join(parsed.problems)


def test_landing_scan_groups_files_and_folders_and_skips_bad_ids(tmp_path):
    store = LocalStore(tmp_path)
    store.write_bytes("landing/samples/s1.h5ad", b"1")
    store.write_bytes("landing/samples/s2/cells.h5ad", b"2")
    store.write_bytes("landing/samples/s2/transcripts.parquet", b"3")
    store.write_bytes("landing/samples/bad,id.h5ad", b"4")
    store.write_bytes("landing/samples/README.txt", b"ignored")
    samples, problems = scan_landing(store, "landing/samples/")
    assert [s.sample_id for s in samples] == ["s1", "s2"]
    assert samples[1].h5ad_key == "landing/samples/s2/cells.h5ad"
    assert len(samples[1].keys) == 2
    assert len(problems) == 1 and "comma" in problems[0]
    store.write_bytes("landing/samples/s10.h5ad", b"5")  # shares the prefix "s1"
    (only,), none = scan_landing(store, "landing/samples/", sample_id="s1")
    assert (only.sample_id, only.keys, none) == ("s1", ("landing/samples/s1.h5ad",), [])
    before = {s.sample_id: s.fingerprint for s in samples}
    store.write_bytes("landing/samples/s2/cells.h5ad", b"changed")
    after = {s.sample_id: s.fingerprint for s in scan_landing(store, "landing/samples/")[0]}
    assert after["s1"] == before["s1"] and after["s2"] != before["s2"]
