"""Local data sources (save_to_disk dirs, data files, imagefolder) and their encoding into model inputs.

Hub data sets (pinned to a commit, loaded through `datasets`) are exercised end to end in test_hub_cli.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
from PIL import Image
from transformers import BertTokenizer, ViTImageProcessor

from hf_otfusion.data import DataSource, encode_dataset, load_dataset_source
from hf_otfusion.errors import DataSourceError, LabelSetMismatchError

WORDS = ["red", "green", "blue", "cat", "dog", "bird", "runs", "sleeps"]


@pytest.fixture
def tokenizer():
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    return BertTokenizer(vocab={word: i for i, word in enumerate(vocab)})


@pytest.fixture
def saved_dict(tmp_path):
    rows = {"text": [f"{WORDS[i % 8]} {WORDS[(3 * i) % 8]}" for i in range(40)], "label": [i % 3 for i in range(40)]}
    features = Features({"text": Value("string"), "label": ClassLabel(names=["a", "b", "c"])})
    splits = DatasetDict({"train": Dataset.from_dict(rows, features=features), "test": Dataset.from_dict(rows)})
    splits.save_to_disk(str(tmp_path / "saved"))
    return tmp_path / "saved"


def test_saved_dataset_dict_defaults_to_train_and_samples_deterministically(saved_dict):
    source = DataSource.resolve(str(saved_dict), num_samples=10, seed=3)
    first = source.load()
    assert source.kind == "disk" and source.split == "train" and source.num_rows == 10
    again = load_dataset_source(str(saved_dict), num_samples=10, seed=3)
    other = load_dataset_source(str(saved_dict), num_samples=10, seed=4)
    assert first[:] == again[:]
    assert first[:]["text"] != other[:]["text"]
    assert set(first[:]["text"]) <= set(load_dataset_source(str(saved_dict))[:]["text"])
    assert len(load_dataset_source(str(saved_dict), split="test", num_samples=1000)) == 40
    with pytest.raises(DataSourceError, match=r"no split 'validation'.*\['train', 'test'\]"):
        load_dataset_source(str(saved_dict), split="validation")


def test_text_is_tokenized_and_class_names_map_to_model_label_ids(saved_dict, tokenizer):
    dataset = load_dataset_source(str(saved_dict), num_samples=6)
    # The model orders its classes differently from the data set's ClassLabel.
    encoded = encode_dataset(dataset, tokenizer, max_length=8, label2id={"c": 0, "a": 1, "b": 2})
    assert set(encoded.column_names) == {"input_ids", "token_type_ids", "attention_mask", "labels"}
    row = encoded[0]
    assert row["input_ids"].shape == (8,) and row["input_ids"].dtype == torch.int64
    words = dataset[0]["text"].split()
    expected = [2, 5 + WORDS.index(words[0]), 5 + WORDS.index(words[1]), 3, 0, 0, 0, 0]
    assert row["input_ids"].tolist() == expected
    assert row["attention_mask"].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    to_model = {0: 1, 1: 2, 2: 0}
    assert encoded[:]["labels"].tolist() == [to_model[label] for label in dataset[:]["label"]]
    with pytest.raises(LabelSetMismatchError, match=r"classes \['c'\] are not labels"):
        encode_dataset(dataset, tokenizer, label2id={"a": 0, "b": 1})


def test_csv_files_with_string_labels_and_a_named_text_column(tmp_path, tokenizer):
    path = tmp_path / "reviews.csv"
    path.write_text("id,body,sentiment\n1,red cat runs,pos\n2,blue dog sleeps,neg\n3,green bird,pos\n")
    source = DataSource.resolve(str(path))
    dataset = source.load()
    assert source.kind == "local" and source.split == "train" and source.num_rows == 3
    with pytest.raises(DataSourceError, match=r"which column holds the text among \['id', 'body', 'sentiment'\]"):
        encode_dataset(dataset, tokenizer, label_column="sentiment", label2id={"neg": 0, "pos": 1})
    encoded = encode_dataset(dataset, tokenizer, text_column="body", label_column="sentiment",
                             label2id={"neg": 0, "pos": 1}, max_length=6)  # fmt: skip
    assert encoded[:]["labels"].tolist() == [1, 0, 1]
    assert encoded[:]["attention_mask"].sum(1).tolist() == [5, 5, 4]
    with pytest.raises(DataSourceError, match="holds strings; pass the model's label2id"):
        encode_dataset(dataset, tokenizer, text_column="body", label_column="sentiment")


def test_imagefolder_images_are_processed_like_the_image_processor_does(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for label in ("3", "7"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(3):
            array = rng.integers(0, 256, (8, 8), dtype=np.uint8)
            Image.fromarray(array).convert("RGB").save(tmp_path / "images" / label / f"{i}.png")
            arrays[(label, i)] = array
    processor = ViTImageProcessor(do_resize=False, image_mean=[0.5], image_std=[0.5], rescale_factor=1 / 255)
    dataset = load_dataset_source(str(tmp_path / "images"))
    encoded = encode_dataset(dataset, processor, label2id={str(d): d for d in range(10)})
    assert encoded[:]["pixel_values"].shape == (6, 1, 8, 8)
    # RGB files are read back as greyscale (one normalisation mean = one channel); grey == the original pixel.
    expected = {(label, arrays[(label, i)].astype(np.float32).sum()) for label, i in arrays}
    got = {
        (str(int(label)), round(float(((pixels[0].numpy() * 0.5 + 0.5) * 255).round().sum())))
        for pixels, label in zip(encoded[:]["pixel_values"], encoded[:]["labels"], strict=True)
    }
    assert got == {(label, round(total)) for label, total in expected}
    assert sorted(encoded[:]["labels"].tolist()) == [3, 3, 3, 7, 7, 7]


def test_encoded_data_passes_through_and_labels_are_renamed():
    pixels = np.random.default_rng(1).normal(size=(5, 1, 8, 8)).astype(np.float32)
    dataset = Dataset.from_dict({"pixel_values": pixels, "label": [0, 1, 2, 1, 0], "note": ["x"] * 5})
    encoded = encode_dataset(dataset)
    assert encoded.column_names == ["pixel_values", "labels"]
    assert torch.equal(encoded[:]["pixel_values"], torch.from_numpy(pixels))
    with pytest.raises(DataSourceError, match=r"no model input columns.*\['note'\]"):
        encode_dataset(Dataset.from_dict({"note": ["x"]}))


def test_missing_local_path_that_is_no_repo_id_is_a_clear_error(tmp_path):
    with pytest.raises(DataSourceError, match="neither an existing local path nor a Hub dataset id"):
        DataSource.resolve(str(tmp_path / "nope" / "x.csv"))
    with pytest.raises(DataSourceError, match=r"Cannot tell how to read"):
        (tmp_path / "notes.xyz").write_text("x")
        load_dataset_source(str(tmp_path / "notes.xyz"))


def test_an_image_processor_without_pillow_names_the_missing_package():
    import subprocess
    import sys
    import textwrap

    from hub_utils import REPO_ROOT

    script = f"""
        import sys
        sys.modules["PIL"] = None  # as if Pillow were not installed
        from hf_otfusion.data import load_processor
        from hf_otfusion.errors import MissingDependencyError
        try:
            load_processor({str(REPO_ROOT / "examples" / "digits-vit-seed0")!r})
        except MissingDependencyError as error:
            print(error.package, "|", error)
        """
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("pillow | ") and "needs Pillow: pip install pillow" in proc.stdout
    assert "tokenizer" not in proc.stdout


def test_a_source_with_one_split_gives_it_whatever_the_default(tmp_path):
    path = tmp_path / "one.csv"
    path.write_text("text,label\\nhello,0\\nworld,1\\n".replace("\\n", "\n"))
    assert DataSource.resolve(str(path), default_split="test").choose_split() == "train"  # csv names it train
    splits = DatasetDict({name: Dataset.from_dict({"x": [1, 2]}) for name in ("train", "test", "validation")})
    splits.save_to_disk(str(tmp_path / "three"))
    assert DataSource.resolve(str(tmp_path / "three"), default_split="test").choose_split() == "test"
    assert DataSource.resolve(str(tmp_path / "three")).choose_split() == "train"
    with pytest.raises(DataSourceError, match=r"has splits \['validation', 'extra'\] and none is 'test'"):
        DatasetDict({name: splits["train"] for name in ("validation", "extra")}).save_to_disk(str(tmp_path / "two"))
        DataSource.resolve(str(tmp_path / "two"), default_split="test").choose_split()


def test_a_slice_of_a_split_is_read_as_load_dataset_reads_it(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("text,label\n" + "".join(f"row {i},{i % 2}\n" for i in range(5)))
    source = DataSource.resolve(str(path), "train[:2]")
    assert source.choose_split() == "train[:2]"
    assert source.load()["text"] == ["row 0", "row 1"]
    with pytest.raises(DataSourceError, match=r"has no split 'test\[:2\]'"):
        DataSource.resolve(str(path), "test[:2]").choose_split()


def test_fuse_reads_data_from_where_it_is_as_the_cli_does(saved_parents, tmp_path):
    """`fuse(data="dir")` loads the rows, and raw images (from there or in memory) are encoded with the anchor's
    saved image processor."""
    import json

    from hf_otfusion import fuse
    from hf_otfusion.data import load_processor

    parent, paths = saved_parents
    processor = {"image_processor_type": "ViTImageProcessor", "do_resize": False, "do_rescale": True,
                 "image_mean": [0.5], "image_std": [0.5]}  # fmt: skip
    for path in paths:
        (tmp_path / path / "preprocessor_config.json").write_text(json.dumps(processor))
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8), mode="L") for _ in range(12)]
    Dataset.from_dict({"image": images}).save_to_disk(str(tmp_path / "raw"))
    from_path = fuse(paths, data=str(tmp_path / "raw"), progress=False)
    encoded = encode_dataset(Dataset.load_from_disk(str(tmp_path / "raw")), load_processor(paths[0]))
    from_rows = fuse(paths, data=encoded, progress=False)
    from_raw_rows = fuse(paths, data=Dataset.load_from_disk(str(tmp_path / "raw")), progress=False)  # encoded here
    for name, tensor in from_path.state_dict().items():
        assert torch.equal(tensor, from_rows.state_dict()[name]), name
        assert torch.equal(tensor, from_raw_rows.state_dict()[name]), name
    with pytest.raises(DataSourceError, match="encode it first with hf_otfusion.encode_dataset"):
        fuse([parent, parent], data=str(tmp_path / "raw"), progress=False)  # in memory: no processor to use
