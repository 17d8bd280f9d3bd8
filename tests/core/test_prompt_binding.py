import pytest
import torch

from comfyui_mixofshow.mixofshow_core.prompt_binding import (UnknownConceptError, bind_layer, concept_words_in,
                                                             distinct_layers, replace_concept_words)


def test_concept_words_found_in_order_and_lora_syntax_ignored():
    assert concept_words_in("(<a1> <a2>:1.2) and <b1>, <lora:x:1>") == ["<a1>", "<a2>", "<b1>"]


def test_replace_pads_sentinel_and_lists_words():
    text, words = replace_concept_words("a <a1><a2>, smiling", {"<a1>", "<a2>"}, "walrus")
    assert text == "a  walrus  walrus , smiling"
    assert words == ["<a1>", "<a2>"]


def test_unknown_word_error_names_it_and_the_known_ones():
    with pytest.raises(UnknownConceptError, match=r"text: unknown concept word <b1>; known words: <a1>, <a2>"):
        replace_concept_words("<a1> <b1>", {"<a1>", "<a2>"}, "walrus")
    with pytest.raises(UnknownConceptError, match="none"):
        replace_concept_words("<b1>", set(), "walrus")


def test_bind_layer_replaces_the_nth_sentinel_with_the_nth_word_row_and_keeps_weights():
    emb = {"<a1>": torch.arange(16.0)[:, None].repeat(1, 3), "<a2>": -torch.arange(16.0)[:, None].repeat(1, 3)}
    chunks = [[(49406, 1.0), (7, 1.0), (99, 1.2), (99, 1.2), (49407, 1.0)]]
    bound = bind_layer(chunks, 99, ["<a2>", "<a1>"], emb, 5)
    assert bound[0][0] == (49406, 1.0) and bound[0][1] == (7, 1.0)
    assert torch.equal(bound[0][2][0], torch.full((3,), -5.0)) and bound[0][2][1] == 1.2
    assert torch.equal(bound[0][3][0], torch.full((3,), 5.0))
    with pytest.raises(ValueError, match="found 2 concept tokens after tokenizing, expected 3"):
        bind_layer(chunks, 99, ["<a2>", "<a1>", "<a1>"], emb, 0)


def test_distinct_layers_groups_identical_rows():
    rows = torch.zeros(16, 4)
    rows[3:] = 1.0
    rows[10] = 2.0
    unique, index_of = distinct_layers({"<a>": rows}, {"<a>"}, 16)
    assert unique == [0, 3, 10]
    assert index_of == [0, 0, 0] + [1] * 7 + [2] + [1] * 5
