"""Every published layout read into records, built at test time from real UTKFace faces (tests/fixtures.py)."""

import math
import os
import re
import shutil
from collections import Counter
from datetime import date

import numpy as np
import pytest
import scipy.io

from c3ae_ray.datasets import Listing, read_dataset
from tests.fixtures import (
    NO_FACE,
    by_path,
    datenum,
    make_fgnet,
    make_folder,
    make_imdb,
    make_utkface,
    make_wiki,
    record,
    write_imdb_wiki_mat,
)

RECORD_KEYS = ["path", "dataset", "subject", "age", "gender", "ethnicity"]


@pytest.fixture
def utk(shared_data):
    return shared_data / "utkface"


@pytest.fixture(params=["wiki", "imdb"])
def imdb_wiki(request, tmp_path, utk):
    make = make_wiki if request.param == "wiki" else make_imdb
    return request.param, make(tmp_path, utk)


# IMDB-WIKI from the .mat


def test_imdb_wiki_mat_with_default_filters(imdb_wiki):
    dataset, built = imdb_wiki
    listing = read_dataset(dataset, built["root"])
    assert isinstance(listing, Listing)
    assert (listing.dataset, listing.root, listing.labelled) == (dataset, str(built["root"]), True)
    assert listing.records == built["records"]
    assert listing.skipped == {"low_face_score": 2, "second_face": 1}
    assert all(list(r) == RECORD_KEYS for r in listing.records)
    assert [r["path"] for r in listing.records] == sorted(r["path"] for r in listing.records)


def test_imdb_wiki_filters_off_keep_every_entry(imdb_wiki):
    dataset, built = imdb_wiki
    listing = read_dataset(dataset, built["root"], min_face_score=None, drop_second_face=False)
    assert listing.records == built["unfiltered"] and len(listing.records) == 12
    assert listing.skipped == {}


def test_imdb_wiki_face_score_threshold(tmp_path, utk):
    built = make_wiki(tmp_path, utk)
    listing = read_dataset("wiki", built["root"], min_face_score=3.0, drop_second_face=False)
    scores = [e["face_score"] for e in built["entries"]]
    assert listing.records == by_path([e["record"] for e in built["entries"] if e["face_score"] >= 3.0])
    assert listing.skipped == {"low_face_score": sum(s < 3.0 for s in scores)}
    # -inf (the release's "no face") fails any threshold, however low.
    low = read_dataset("wiki", built["root"], min_face_score=-1e9, drop_second_face=False)
    assert low.skipped == {"low_face_score": 1}
    assert not any(r["path"].endswith(built["entries"][NO_FACE]["full_path"]) for r in low.records)


def test_face_score_filter_needs_a_score_at_least_the_minimum(tmp_path):
    scores = [1.0, 0.999, math.nan, -math.inf, math.inf]
    entries = [
        {"dob": 723671.0, "photo_taken": 2009, "full_path": f"0{i}/{i}_x.jpg", "gender": 1.0,
         "face_score": score, "second_face_score": math.nan}
        for i, score in enumerate(scores)
    ]
    write_imdb_wiki_mat(tmp_path / "wiki.mat", "wiki", entries)
    listing = read_dataset("wiki", tmp_path, min_face_score=1.0)
    assert [r["subject"] for r in listing.records] == ["0", "4"]
    assert listing.skipped == {"low_face_score": 3}
    assert len(read_dataset("wiki", tmp_path, min_face_score=None).records) == 5


def test_imdb_wiki_parent_root_and_missing_file(imdb_wiki):
    dataset, built = imdb_wiki
    parent = built["root"].parent
    listing = read_dataset(dataset, parent)
    assert listing.root == str(parent) and listing.records == built["records"]
    missing = [r for r in listing.records if r["path"] == built["missing"]]
    assert len(missing) == 1 and not os.path.exists(built["missing"])


def test_imdb_wiki_gender_subject_and_convention(tmp_path, utk):
    """IMDB-WIKI's gender is 1 male, 0 female, NaN unknown: the reader turns it into words like UTKFace's."""
    wiki = read_dataset("wiki", make_wiki(tmp_path / "w", utk)["root"], min_face_score=None, drop_second_face=False)
    imdb = read_dataset("imdb", make_imdb(tmp_path / "i", utk)["root"], min_face_score=None, drop_second_face=False)
    for listing in (wiki, imdb):
        assert {r["gender"] for r in listing.records} == {"male", "female", None}
        assert sum(r["gender"] is None for r in listing.records) == 1
    for r in wiki.records:
        assert r["subject"] == os.path.basename(r["path"]).split("_")[0] and r["subject"].isdigit()
    assert sorted({r["subject"] for r in imdb.records}, key=int) == ["1", "2", "3", "4"]
    assert sum(r["subject"] == "1" for r in imdb.records) == 3


def test_mat_absent_falls_back_to_file_names(imdb_wiki):
    dataset, built = imdb_wiki
    built["mat"].unlink()
    listing = read_dataset(dataset, built["root"])
    assert listing.records == built["fallback_records"]
    assert listing.skipped == {"bad_name": 1}  # 00/portrait.jpg
    assert all(r["gender"] is None for r in listing.records)
    # Filters need the .mat: every image on disk is listed, the "no face" one included.
    assert len(listing.records) == 11
    # The fallback, like the .mat, works from the parent too.
    assert read_dataset(dataset, built["root"].parent).records == built["fallback_records"]


def test_fallback_names_give_the_same_ages_as_the_mat(imdb_wiki):
    dataset, built = imdb_wiki
    from_mat = read_dataset(dataset, built["root"], min_face_score=None, drop_second_face=False)
    built["mat"].unlink()
    from_names = read_dataset(dataset, built["root"])
    ages = {r["path"]: r["age"] for r in from_names.records}
    assert {r["path"]: r["age"] for r in from_mat.records if r["path"] in ages} == ages
    assert sum(age is None for age in ages.values()) == 1  # the invalid date


def test_fallback_names(tmp_path, utk):
    face = sorted(utk.iterdir())[0]
    names = {
        "10000217_1981-05-05_2009.jpg": ("10000217", 28.0),  # the release's first wiki entry
        "1_1990-06-30_2010.JPG": ("1", 20.0),
        "2_1990-07-01_2010.jpg": ("2", 19.0),
        "nm0000001_rm124825600_1899-5-10_1968.jpg": ("nm0000001", 69.0),
        "3_1990-02-30_2010.jpg": ("3", None),  # matches, but no such day
        "4_1990-00-10_2010.jpg": ("4", None),
    }
    for name in [*names, "4_1990_2010.jpg", "holiday.png", "1_1990-01-01_2010.jpg.txt"]:
        shutil.copyfile(face, tmp_path / name)
    listing = read_dataset("wiki", tmp_path)
    assert listing.records == by_path(
        [record(tmp_path / name, "wiki", subject, age) for name, (subject, age) in names.items()]
    )
    assert listing.skipped == {"bad_name": 2}


def test_age_rule_datenum_july_boundary_and_invalid_dob(tmp_path):
    """DEX's rule: birth = fromordinal(int(dob) - 366), age = photo year - birth year - (birth month >= 7)."""
    cases = [  # dob, photo_taken, expected age
        (723671.0, 2009, 28.0),  # 1981-05-05, the first entry of the real wiki.mat
        (datenum(date(1981, 6, 30)), 2009, 28.0),
        (datenum(date(1981, 6, 30)) + 0.99, 2009, 28.0),  # fraction of a day: still 30 June
        (datenum(date(1981, 7, 1)), 2009, 27.0),
        (datenum(date(1981, 12, 31)), 2009, 27.0),
        (datenum(date(2010, 1, 1)), 2009, -1.0),  # no range filter in the reader
        (math.nan, 2009, None),
        (0.0, 2009, None),
        (365.0, 2009, None),  # year 0
        (math.inf, 2009, None),
        (1e12, 2009, None),
    ]
    entries = [
        {"dob": dob, "photo_taken": taken, "full_path": f"{i:02d}/{i}_x.jpg", "gender": 1.0,
         "face_score": 2.0, "second_face_score": math.nan}
        for i, (dob, taken, _) in enumerate(cases)
    ]
    write_imdb_wiki_mat(tmp_path / "wiki.mat", "wiki", entries)
    listing = read_dataset("wiki", tmp_path)
    ages = {r["path"]: r["age"] for r in listing.records}
    assert [ages[str(tmp_path / e["full_path"])] for e in entries] == [age for _, _, age in cases]


def test_single_entry_mat_and_broken_mats(tmp_path):
    entry = {"dob": 723671.0, "photo_taken": 2009, "full_path": "17/10000217_x.jpg", "gender": 0.0,
             "face_score": 2.0, "second_face_score": math.nan, "celeb_id": 42}
    write_imdb_wiki_mat(tmp_path / "one" / "imdb.mat", "imdb", [entry], ["Somebody"])
    assert read_dataset("imdb", tmp_path / "one").records == [
        record(tmp_path / "one" / "17" / "10000217_x.jpg", "imdb", "42", 28.0, "female")
    ]
    write_imdb_wiki_mat(tmp_path / "other" / "imdb.mat", "wiki", [entry])  # holds `wiki`, not `imdb`
    with pytest.raises(ValueError, match="has no struct variable 'imdb'"):
        read_dataset("imdb", tmp_path / "other")
    (tmp_path / "short").mkdir()
    scipy.io.savemat(str(tmp_path / "short" / "wiki.mat"), {"wiki": {"dob": np.array([723671.0])}})
    with pytest.raises(ValueError, match="lacks the fields photo_taken, full_path, gender, face_score"):
        read_dataset("wiki", tmp_path / "short")


def test_the_real_wiki_mat(shared_data, tmp_path):
    """IMDB-WIKI's own wiki.mat (62,328 entries, no images): what each filter drops, DEX ages (checked against the
    birth date and photo year in each file name), gender coding (0 female, 1 male, NaN unknown), paths."""
    source = shared_data / "imdb-wiki" / "wiki.mat"
    crop = tmp_path / "wiki_crop"
    crop.mkdir()
    (crop / "wiki.mat").symlink_to(source)
    raw = scipy.io.loadmat(str(source), variable_names=["wiki"])["wiki"].reshape(-1)[0]
    face_score, second, gender = (raw[name].reshape(-1).astype(float) for name in ("face_score", "second_face_score", "gender"))
    assert len(face_score) == 62_328
    every = read_dataset("wiki", tmp_path, min_face_score=None, drop_second_face=False)  # root: the crop folder's parent
    assert len(every.records) == 62_328 and every.skipped == {}
    low = int((~(face_score >= 1.0)).sum())  # -inf (no face) and weak faces
    seconds = int(((face_score >= 1.0) & ~np.isnan(second)).sum())
    listing = read_dataset("wiki", crop)
    assert listing.skipped == {"low_face_score": low, "second_face": seconds}
    assert len(listing.records) == 62_328 - low - seconds and 20_000 < len(listing.records) < 62_328
    kept = (face_score >= 1.0) & np.isnan(second)
    genders = Counter(r["gender"] for r in listing.records)
    assert genders == {"female": int((gender[kept] == 0).sum()), "male": int((gender[kept] == 1).sum()),
                       None: int(np.isnan(gender[kept]).sum())}
    assert genders["male"] > genders["female"] > 0 and genders[None] > 0
    checked = 0
    for record in every.records[::50]:
        assert record["path"].startswith(f"{crop}/") and record["dataset"] == "wiki" and record["ethnicity"] is None
        name = os.path.basename(record["path"])
        match = re.fullmatch(r"(\d+)_(\d+)-(\d+)-(\d+)_(\d{4})\.jpg", name)
        assert match and record["subject"] == match[1]
        year, month, taken = int(match[2]), int(match[3]), int(match[5])
        if record["age"] is not None and 1900 < year < 2100 and 1 <= month <= 12:
            assert record["age"] == taken - year - (month >= 7), name  # DEX: the photo is taken mid-year
            checked += 1
    assert checked > 1000


# UTKFace


def test_utkface_subset(tmp_path, utk):
    built = make_utkface(tmp_path, utk)
    listing = read_dataset("utkface", tmp_path)
    assert listing.records == built["records"] and len(listing.records) == 17
    assert listing.skipped == {"bad_name": 2}
    assert listing.labelled and listing.dataset == "utkface"
    by_name = {os.path.basename(r["path"]): r for r in listing.records}
    labels = {name: (r["age"], r["gender"], r["ethnicity"]) for name, r in by_name.items()}
    assert labels["61_1_20170109142408075.jpg.chip.jpg"] == (61.0, "female", None)  # no race field
    assert labels["61_3_20170109150557335.jpg.chip.jpg"] == (61.0, None, "indian")  # no gender field
    assert labels["30_2_0_20170103182359125.jpg"] == (30.0, None, "white")  # gender 2 is neither
    assert labels["24_0_1_20170116220224657 .jpg.chip.jpg"] == (24.0, "male", "black")  # a space
    assert labels["55_0_0_20170116232725357jpg.chip.jpg"] == (55.0, "male", "white")  # no dot
    assert any(name.endswith(".JPG.CHIP.JPG") for name in by_name)
    assert any("part2" in r["path"] for r in listing.records)


def test_utkface_gender_convention(tmp_path, utk):
    """UTKFace writes 0 for male and 1 for female, the reverse of IMDB-WIKI."""
    face = sorted(utk.iterdir())[0]
    shutil.copyfile(face, tmp_path / "25_0_3_20170119171321470.jpg.chip.jpg")
    shutil.copyfile(face, tmp_path / "26_1_3_20170119171321470.jpg")
    listing = read_dataset("utkface", tmp_path)
    assert [(r["age"], r["gender"], r["subject"]) for r in listing.records] == [(25.0, "male", None),
                                                                                (26.0, "female", None)]


def test_utkface_real_folder(utk):
    names = sorted(os.listdir(utk))
    listing = read_dataset("utkface", utk)
    assert len(listing.records) == 7807 and listing.skipped == {}
    assert [r["path"] for r in listing.records] == sorted(str(utk / name) for name in names)
    genderless = {os.path.basename(r["path"]) for r in listing.records if r["gender"] is None}
    # The release has a few names short of a field; this copy holds one of them.
    assert genderless == {"61_3_20170109150557335.jpg.chip.jpg"}
    assert next(r for r in listing.records if r["gender"] is None)["age"] == 61.0
    races = ["white", "black", "asian", "indian", "other"]
    for r in listing.records[::97]:
        age, gender, race = os.path.basename(r["path"]).split("_")[:3]
        assert r["age"] == float(age) and r["gender"] == {"0": "male", "1": "female"}[gender]
        assert r["ethnicity"] == races[int(race)]
    assert 3000 < sum(r["gender"] == "female" for r in listing.records) < 5000
    assert all(r["ethnicity"] in races for r in listing.records if r["gender"] is not None)


def test_utkface_more_keeps_the_releases_flawed_names(shared_data):
    """The second folder's four flawed names (the shared README) are all kept with what they carry."""
    more = shared_data / "utkface-more"
    listing = read_dataset("utkface", more)
    assert len(listing.records) == 13_885 and listing.skipped == {}
    labels = {os.path.basename(r["path"]): (r["age"], r["gender"], r["ethnicity"]) for r in listing.records}
    assert labels["24_0_1_20170116220224657 .jpg.chip.jpg"] == (24.0, "male", "black")
    assert labels["39_1_20170116174525125.jpg.chip.jpg"] == (39.0, "female", None)
    assert labels["61_1_20170109150557335.jpg.chip.jpg"] == (61.0, "female", None)
    assert labels["55_0_0_20170116232725357jpg.chip.jpg"] == (55.0, "male", "white")
    assert sum(r["gender"] is None for r in listing.records) == 0
    assert sum(r["ethnicity"] is None for r in listing.records) == 2


def test_a_root_of_linked_folders_reads_both_shared_folders_once(shared_data, tmp_path):
    """All of UTKFace is one root of two links (the second bundled model's data); a link back up is no loop."""
    (tmp_path / "utkface").symlink_to(shared_data / "utkface")
    (tmp_path / "more").symlink_to(shared_data / "utkface-more")
    (tmp_path / "more-again").symlink_to(tmp_path)
    listing = read_dataset("utkface", tmp_path)
    folders = Counter(os.path.relpath(r["path"], tmp_path).split(os.sep)[0] for r in listing.records)
    assert folders == {"utkface": 7_807, "more": 13_885}


# FG-NET


def test_fgnet(tmp_path, utk):
    built = make_fgnet(tmp_path, utk, subjects=3, per_subject=4)
    listing = read_dataset("fgnet", tmp_path)
    assert listing.records == built["records"] and len(listing.records) == 12
    assert listing.skipped == {"bad_name": 2}
    assert sorted({r["subject"] for r in listing.records}) == ["001", "041", "081"]
    assert all(r["gender"] is None and 0 <= r["age"] < 70 for r in listing.records)


def test_fgnet_names_any_case(tmp_path, utk):
    face = sorted(utk.iterdir())[0]
    names = {"001A02.JPG": ("001", 2.0), "001a15b.jpg": ("001", 15.0), "082A18.jpg": ("082", 18.0),
             "069a00C.Jpg": ("069", 0.0)}
    (tmp_path / "sub").mkdir()
    for name in names:
        shutil.copyfile(face, tmp_path / "sub" / name)
    for name in ["01A02.JPG", "001B02.JPG", "001A02.png"]:
        shutil.copyfile(face, tmp_path / name)
    listing = read_dataset("fgnet", tmp_path)
    assert listing.records == by_path(
        [record(tmp_path / "sub" / name, "fgnet", subject, age) for name, (subject, age) in names.items()]
    )
    assert listing.skipped == {"bad_name": 3}


# Any folder


def test_folder_without_csv(tmp_path, utk):
    built = make_folder(tmp_path, utk)
    listing = read_dataset("folder", tmp_path)
    assert listing.records == built["records"] and len(listing.records) == 8
    assert listing.labelled is False and listing.skipped == {}
    assert {os.path.splitext(r["path"])[1] for r in listing.records} == {
        ".jpg", ".JPEG", ".png", ".bmp", ".webp", ".tif", ".TIFF"
    }
    assert all(r["age"] is None and r["subject"] is None for r in listing.records)


def test_folder_with_labels_csv_in_root(tmp_path, utk):
    built = make_folder(tmp_path, utk, labels="root")
    listing = read_dataset("folder", tmp_path)
    assert listing.labelled and listing.records == built["records"]
    assert len(listing.records) == 8  # 7 of the 8 images, and one row whose image is absent
    ages = [r["age"] for r in listing.records]
    assert ages.count(None) == 1 and all(isinstance(a, float) for a in ages if a is not None)
    assert sum(r["subject"] is None for r in listing.records) == 1
    assert str(tmp_path / "photos" / "gone.jpg") in {r["path"] for r in listing.records}


def test_folder_with_csv_argument(tmp_path, utk):
    built = make_folder(tmp_path / "photos_root", utk, labels="outside")
    listing = read_dataset("folder", built["root"], csv=built["csv"])
    assert listing.labelled and listing.records == built["records"]
    assert all(r["subject"] is None for r in listing.records)
    # Given explicitly, the CSV wins over an unlabelled reading.
    assert not read_dataset("folder", built["root"]).labelled


def test_folder_csv_values(tmp_path):
    (tmp_path / "labels.csv").write_text(
        "\ufeffpath, age ,subject\n"
        "a.jpg,31.5,p1\n"
        f"{tmp_path / 'x' / 'b.png'},nan,\n"
        "c.jpg,,p2\n"
        ",40,p3\n"
        "sub/../d.jpg,7,\n"
    )
    listing = read_dataset("folder", tmp_path)
    assert listing.records == [
        record(tmp_path / "a.jpg", "folder", "p1", 31.5),
        record(tmp_path / "c.jpg", "folder", "p2", None),
        record(tmp_path / "d.jpg", "folder", None, 7.0),
        record(tmp_path / "x" / "b.png", "folder", None, None),
    ]
    assert listing.skipped == {"no_path": 1}


@pytest.mark.parametrize("header", ["path,subject", "file,age", ""])
def test_folder_csv_without_path_or_age_is_an_error(tmp_path, header):
    (tmp_path / "labels.csv").write_text(f"{header}\na.jpg,30\n" if header else "")
    with pytest.raises(ValueError, match="needs the columns path and age"):
        read_dataset("folder", tmp_path)


# Errors


def test_unknown_dataset_and_missing_root(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'morph'"):
        read_dataset("morph", tmp_path)
    with pytest.raises(ValueError, match="is not a folder"):
        read_dataset("utkface", tmp_path / "nowhere")
    (tmp_path / "file.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="is not a folder"):
        read_dataset("folder", tmp_path / "file.jpg")


@pytest.mark.parametrize("dataset", ["wiki", "imdb", "utkface", "fgnet", "folder"])
def test_root_without_the_layout_is_an_error(tmp_path, utk, dataset):
    (tmp_path / "notes.txt").write_text("no images here\n")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path))):
        read_dataset(dataset, tmp_path)
    if dataset != "folder":  # images, but none named as the layout names them
        shutil.copyfile(sorted(utk.iterdir())[0], tmp_path / "portrait.jpg")
        with pytest.raises(ValueError, match="under"):
            read_dataset(dataset, tmp_path)


def test_csv_errors(tmp_path, utk):
    make_folder(tmp_path, utk)
    with pytest.raises(ValueError, match="does not exist"):
        read_dataset("folder", tmp_path, csv=tmp_path / "absent.csv")
    with pytest.raises(ValueError, match="folder layout only"):
        read_dataset("utkface", tmp_path, csv=tmp_path / "absent.csv")
    (tmp_path / "labels.csv").write_text("path,age\n")
    with pytest.raises(ValueError, match="lists no image"):
        read_dataset("folder", tmp_path)
