"""The main command's plans: what `scripts/demo.sh` options turn into (no server)."""
import pytest

from comfyui_mixofshow.harness import demo, workflows


def test_train_option_names_the_words_after_the_folder(tmp_path):
    (tmp_path / "Harry Potter" / "masks").mkdir(parents=True)
    plain = tmp_path / "hermione"
    plain.mkdir()
    with_class = demo.folder_training(f"{tmp_path / 'Harry Potter'}=man")
    assert with_class.words == ("<harry_potter1>", "<harry_potter2>")
    assert with_class.initializers == (demo.RANDOM_INIT, "man")
    assert with_class.masks == tmp_path / "Harry Potter" / "masks" and with_class.edlora == "harry_potter.safetensors"
    without = demo.folder_training(str(plain))
    assert without.initializers == (demo.RANDOM_INIT, demo.RANDOM_INIT) and without.masks == ""
    with pytest.raises(SystemExit, match="is not a folder"):
        demo.folder_training(str(tmp_path / "missing"))


def test_training_graph_carries_the_concept_and_keeps_unset_settings():
    workflow = workflows.load_workflow(workflows.TRAIN_WORKFLOW)
    graph = workflows.build_train_prompt(workflow, "sd15.safetensors", "/data/cat", ("<c1>", "<c2>"),
                                         ("<rand-0.013>", "cat"), "cat", "/data/cat/masks", steps=6, resolution=64)
    train = graph[workflows.only_node(graph, "MixOfShowEDLoRATrain")]["inputs"]
    original = workflow[workflows.only_node(workflow, "MixOfShowEDLoRATrain")]["inputs"]
    assert (train["dataset_folder"], train["masks_folder"], train["output_name"]) == ("/data/cat", "/data/cat/masks", "cat")
    assert (train["concept_word_1"], train["initializer_2"], train["steps"], train["resolution"]) == ("<c1>", "cat", 6, 64)
    assert train["batch_size"] == original["batch_size"] and train["lr_unet"] == original["lr_unet"]
    assert graph[workflows.only_node(graph, "CheckpointLoaderSimple")]["inputs"]["ckpt_name"] == "sd15.safetensors"


@pytest.mark.parametrize("argv, message", [
    (["--train", "photos/potter"], "needs the SD1.5 checkpoint"),
    (["--checkpoint", "sd15.safetensors"], "also give --edlora and/or --train"),
])
def test_options_without_their_model_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        demo.parse_args(argv)
    assert message in capsys.readouterr().err
