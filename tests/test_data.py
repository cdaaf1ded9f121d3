import numpy as np
import pytest

from conftest import write_tone
from jaxtl.data import DataError, detect_layout, discover, split_indices, subset, synthetic


def _folders(tmp_path, n=5):
    for label in ("cat", "dog", "bird"):
        for i in range(n):
            write_tone(tmp_path / "ds" / label / f"{label}{i}.wav", seconds=0.1)
    return tmp_path / "ds"


def test_class_folders(tmp_path):
    ds = discover(_folders(tmp_path))
    assert ds.layout == "folders" and len(ds.paths) == 15
    assert list(ds.encoder().classes_) == ["bird", "cat", "dog"]


def test_fsdd_names_give_label_speaker_and_split(tmp_path):
    for d in range(2):
        for spk in ("ann", "bob"):
            for i in range(7):
                write_tone(tmp_path / "rec" / f"{d}_{spk}_{i}.wav", seconds=0.1)
    ds = discover(tmp_path / "rec")
    assert ds.layout == "fsdd" and len(ds.paths) == 28
    assert set(ds.groups) == {"ann", "bob"}
    assert sum(s == "test" for s in ds.splits) == 2 * 2 * 5


def test_single_subfolder_is_entered(tmp_path):
    for i in range(3):
        write_tone(tmp_path / "fsdd" / "recordings" / f"1_x_{i}.wav", seconds=0.1)
    assert discover(tmp_path / "fsdd").layout == "fsdd"


def test_csv_manifest(tmp_path):
    for i in range(4):
        write_tone(tmp_path / "a" / f"{i}.wav", seconds=0.1)
    (tmp_path / "manifest.csv").write_text(
        "path,label,split,group\n" + "".join(f"a/{i}.wav,{'yes' if i % 2 else 'no'},{'test' if i == 0 else 'train'},"
                                             f"g{i}\n" for i in range(4)))
    ds = discover(tmp_path)
    assert ds.layout == "csv" and ds.labels == ["no", "yes", "no", "yes"]
    assert ds.splits[0] == "test" and ds.groups[3] == "g3"
    assert all(p.startswith(str(tmp_path)) for p in ds.paths)
    assert discover(tmp_path / "manifest.csv", "csv").paths == ds.paths


def test_bad_manifest_row(tmp_path):
    (tmp_path / "m.csv").write_text("a.wav\n")
    with pytest.raises(DataError, match=r"m\.csv: row 1 needs at least path,label"):
        discover(tmp_path / "m.csv")


def test_empty_directory_and_missing_path(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: no audio files"):
        discover(tmp_path / "empty")
    with pytest.raises(DataError, match="no such file"):
        discover(tmp_path / "nope")


def test_unsupported_extension_in_class_folder_is_reported(tmp_path):
    root = _folders(tmp_path)
    (root / "cat" / "notes.txt").write_text("x")
    ds = discover(root)
    assert len(ds.paths) == 15 and len(ds.bad) == 1 and "unsupported extension .txt" in str(ds.bad[0])


def test_stratified_split_is_the_seeds_and_stratified():
    from sklearn.model_selection import train_test_split

    y = np.repeat(np.arange(5), 20)
    classes = list("abcde")
    train, val, test, _ = split_indices(y, [""] * 100, [""] * 100, "stratified", 0.2, 0.2, 42, classes)
    _, seed_test = train_test_split(np.arange(100), test_size=0.2, stratify=y, random_state=42)
    np.testing.assert_array_equal(np.sort(test), np.sort(seed_test))
    assert np.all(np.bincount(y[test]) == 4) and len(val) == 16 and len(set(train) | set(val) | set(test)) == 100


def test_tail_validation_is_keras_validation_split():
    y = np.repeat(np.arange(2), 10)
    train, val, test, _ = split_indices(y, [""] * 20, [""] * 20, "stratified", 0.2, 0.25, 0, ["a", "b"], "tail")
    assert len(val) == 4 and len(train) == 12


def test_group_split_keeps_speakers_apart():
    y = np.tile(np.arange(2), 30)
    groups = [f"s{i % 5}" for i in range(60)]
    train, val, test, _ = split_indices(y, groups, [""] * 60, "group", 0.2, 0.2, 0, ["a", "b"])
    g = np.asarray(groups)
    assert not set(g[test]) & set(g[np.concatenate([train, val])])


def test_fsdd_split_uses_the_marks():
    y = np.array([0, 1] * 5)
    given = ["test", "train", "train", "test", "train", "train", "train", "train", "train", "train"]
    _, _, test, _ = split_indices(y, [""] * 10, given, "fsdd", 0.2, 0.0, 0, ["a", "b"])
    assert list(test) == [0, 3]


def test_too_small_to_stratify_names_the_class():
    y = np.array([0, 0, 0, 1, 0, 0])
    with pytest.raises(DataError, match="class 'dog' has 1 clip"):
        split_indices(y, [""] * 6, [""] * 6, "stratified", 0.2, 0.2, 0, ["cat", "dog"])


def test_max_clips_is_a_stratified_subset():
    y = np.repeat(np.arange(4), 25)
    kept = subset(y, 40, 0, list("abcd"))
    assert len(kept) == 40 and np.all(np.bincount(y[kept]) == 10)
    with pytest.raises(DataError, match="below the number of classes"):
        subset(y, 3, 0, list("abcd"))


def test_synthetic_dataset_is_built_once_and_usable(tmp_path):
    root = synthetic(tmp_path, clips_per_class=3)
    assert synthetic(tmp_path, clips_per_class=3) == root
    ds = discover(root)
    assert detect_layout(root) == "folders" and len(ds.paths) == 12 and len(set(ds.labels)) == 4


def test_group_split_can_hold_out_one_named_speaker():
    y = np.tile(np.arange(2), 30)
    groups = [f"s{i % 5}" for i in range(60)]
    train, val, test, _ = split_indices(y, groups, [""] * 60, "group", 0.2, 0.2, 0, ["a", "b"], test_group="s3")
    g = np.asarray(groups)
    assert set(g[test]) == {"s3"} and "s3" not in set(g[np.concatenate([train, val])])
    with pytest.raises(DataError, match="'s9' is not a group"):
        split_indices(y, groups, [""] * 60, "group", 0.2, 0.2, 0, ["a", "b"], test_group="s9")


def test_group_split_validation_holds_out_whole_groups():
    y = np.tile(np.arange(2), 60)
    groups = [f"s{i % 6}" for i in range(120)]
    fit, val, test, _ = split_indices(y, groups, [""] * 120, "group", 0.2, 0.25, 0, ["a", "b"])
    g = np.asarray(groups)
    sides = [set(g[fit]), set(g[val]), set(g[test])]
    assert all(sides) and not (sides[0] & sides[1] or sides[0] & sides[2] or sides[1] & sides[2])
    with pytest.raises(DataError, match="grouped validation needs at least 2 groups"):
        split_indices(y, [f"s{i % 2}" for i in range(120)], [""] * 120, "group", 0.2, 0.25, 0, ["a", "b"],
                      test_group="s1")


def test_too_few_clips_for_the_classes_is_one_line_saying_what_to_change():
    y = np.repeat(np.arange(10), 5)  # 50 clips of 10 classes: 8 validation clips cannot hold 10 classes
    with pytest.raises(DataError) as e:
        split_indices(y, [""] * 50, [""] * 50, "stratified", 0.2, 0.2, 42, [str(i) for i in range(10)])
    assert "cannot split 40 clips of 10 classes" in str(e.value) and "\n" not in str(e.value)


def test_a_held_out_group_is_in_no_other_split():
    y = np.tile(np.arange(2), 60)
    groups = [f"s{i % 4}" for i in range(120)]
    fit, val, test, holdout = split_indices(y, groups, [""] * 120, "stratified", 0.2, 0.25, 0, ["a", "b"],
                                            holdout_group="s2")
    assert {groups[i] for i in holdout} == {"s2"} and len(holdout) == 30
    assert "s2" not in {groups[i] for i in np.concatenate([fit, val, test])}
    assert sorted(np.concatenate([fit, val, test, holdout]).tolist()) == list(range(120))
    with pytest.raises(DataError, match="--holdout-group 's9' is not a group"):
        split_indices(y, groups, [""] * 120, "stratified", 0.2, 0.25, 0, ["a", "b"], holdout_group="s9")
