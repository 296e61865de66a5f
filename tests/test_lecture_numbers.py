"""The lecture's numbers beside cnnkit's: exact integers where the answer is an integer, and the
disagreements the lecture really has (flagged with their reason, never 'fixed')."""

from __future__ import annotations

import pytest

from cnnkit.lecture import augment_counts, imagenet_numbers, pixelwise_numbers, zoo_numbers
from cnnkit.lecture.html import markdown_to_html


def _by_what(section):
    return {n.what: n for n in section.numbers}


def test_alexnet_rows_and_the_two_known_disagreements(tmp_path):
    rows = _by_what(zoo_numbers.alexnet(tmp_path, quick=True, seed=0))
    assert rows["AlexNet neurons in conv1"].computed == "290,400" and rows["AlexNet neurons in conv1"].agrees is False
    assert "48x55x96" in rows["AlexNet neurons in conv1"].note
    for layer, value in [("conv2", "186,624"), ("conv3", "64,896"), ("conv5", "43,264"), ("fc8", "1,000")]:
        assert rows[f"AlexNet neurons in {layer}"].computed == value and rows[f"AlexNet neurons in {layer}"].agrees
    assert rows["AlexNet connections"].computed == "724,406,816" and "630 million" in rows["AlexNet connections"].note
    assert rows["AlexNet parameters"].computed == "60,965,224" and rows["AlexNet parameters"].agrees
    assert rows["AlexNet neurons (conv and FC outputs)"].computed == "659,272"
    assert rows["AlexNet conv layers followed by max pooling"].computed == "1, 2, 5"


def test_deep_image_counts_are_drawn_from_the_transforms():
    counts = {n.what.split(":")[0]: n for n in augment_counts.deep_image_counts().numbers}
    assert counts["colour casting"].computed == "68,920" and counts["colour casting"].agrees
    assert counts["flipping"].computed == "2" and counts["flipping"].agrees
    assert counts["cropping 224x224 from 512x512"].computed == "83,521"  # 289^2: one offset per axis more
    assert counts["cropping 224x224 from 512x512"].agrees is False
    for what in ("rotation", "vignetting", "lens distortion"):
        assert counts[what].agrees is None and counts[what].computed == "continuous"


def test_nin_and_alexnet_sizes():
    rows = _by_what(zoo_numbers.nin(None, quick=True, seed=0))
    assert rows["NIN parameters"].computed == "7,595,176" and rows["NIN parameters"].agrees
    assert rows["NIN size (float32)"].computed == "29.0 MiB" and rows["NIN size (float32)"].agrees
    assert rows["AlexNet size (float32)"].computed == "232.6 MiB" and rows["AlexNet size (float32)"].agrees


def test_table_cells_of_chatfield_clarifai_overfeat_vgg_googlenet():
    chat = zoo_numbers.chatfield(None, quick=True, seed=0)
    assert all(n.agrees for n in chat.numbers), [n for n in chat.numbers if not n.agrees]
    clar = _by_what(zoo_numbers.clarifai(None, quick=True, seed=0))
    assert clar["Clarifai/ZF conv2"].agrees is False and "26x26" in clar["Clarifai/ZF conv2"].note
    assert clar["first layer kernel, AlexNet -> Clarifai"].computed == "11x11 to 7x7"
    vgg = _by_what(zoo_numbers.vgg(None, quick=True, seed=0))
    assert [vgg[f"vgg_{c} weight layers"].computed for c in "abcde"] == ["11", "13", "16", "16", "19"]
    goog = zoo_numbers.googlenet(None, quick=True, seed=0)
    wrong = sorted({n.what.split()[1] for n in goog.numbers if n.agrees is False})
    assert wrong == ["conv1", "inception_4c", "inception_5a"]  # the rows whose printed values do not add up


def test_cell_parser_reads_the_lectures_spellings():
    assert zoo_numbers.parse_cell("256x5x5 st. 1 pad 1 x2 pool") == {
        "filters": 256, "kernel": 5, "stride": 1, "pad": 1, "lrn": False, "pool": 2}
    assert zoo_numbers.parse_cell("96x7x7 st. 2, LRN,x2 pool")["pad"] is None
    with pytest.raises(ValueError):
        zoo_numbers.parse_cell("4096 dropout")


def test_fc_to_conv_kernels_of_alexnet():
    rows = {n.what: n for n in pixelwise_numbers.fc_to_conv_numbers()}
    assert rows["AlexNet fc6 as convolution: kernel (after a pooling layer: C x M x M)"].computed == "256x6x6"
    assert all(n.agrees for n in rows.values())


def test_imagenet_results_are_listed_not_faked():
    section = imagenet_numbers.imagenet(None, quick=True, seed=0)
    assert all(n.agrees is None and n.computed == "-" for n in section.numbers)
    assert any(n.lecture == "0.15315" for n in section.numbers)


def test_markdown_to_html_subset():
    page = markdown_to_html("# T\n\ntext with `a<b` and **bold**\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n"
                            "![fig](x.png)\n\n- one\n  - nested\n")
    assert "<h1>T</h1>" in page and "<code>a&lt;b</code>" in page and "<b>bold</b>" in page
    assert "<td>1</td><td>2</td>" in page and '<img alt="fig" src="x.png">' in page
    assert "<li>one<ul><li>nested</li></ul></li>" in page
