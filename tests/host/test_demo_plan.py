"""The main command's plans: what `scripts/demo.sh` options turn into, and how its HTTP client
rides out a busy server (a local stand-in server, no ComfyUI)."""
import http.server
import json
import threading
import time

import pytest

from comfyui_mixofshow.harness import demo, workflows
from comfyui_mixofshow.harness import server as harness_server


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


class SlowOnceHandler(http.server.BaseHTTPRequestHandler):
    """Answers GET /history/p and POST /prompt; the first request of each sleeps past the client's timeout."""
    seen = []

    def answer(self):
        self.seen.append((self.command, self.path))
        if [c for c, _ in self.seen].count(self.command) == 1:
            time.sleep(1.0)
        body = json.dumps({"p": {"status": {"status_str": "success"}, "outputs": {}}}).encode()
        try:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up on this one

    do_GET = do_POST = answer

    def log_message(self, *args):
        pass


@pytest.fixture
def slow_server():
    SlowOnceHandler.seen = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SlowOnceHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_history_poll_that_times_out_is_retried(slow_server):
    client = harness_server.ComfyClient(slow_server, timeout=0.3)
    assert client.wait("p")["status"]["status_str"] == "success"
    assert SlowOnceHandler.seen[:2] == [("GET", "/history/p"), ("GET", "/history/p")]


def test_a_prompt_post_is_never_sent_twice(slow_server):
    client = harness_server.ComfyClient(slow_server, timeout=0.3)
    with pytest.raises(TimeoutError):
        client.queue({})
    assert SlowOnceHandler.seen == [("POST", "/prompt")]


def test_failures_are_reported_in_one_line():
    rejected = harness_server.ComfyError("POST /prompt rejected (HTTP 400): Prompt outputs failed validation\n"
                                         "  node 3 (KSampler): Value too big: steps\n")
    assert demo.failure_line(rejected) == ("POST /prompt rejected (HTTP 400): Prompt outputs failed validation | "
                                           "node 3 (KSampler): Value too big: steps")
    assert demo.failure_line(TimeoutError("timed out")) == "TimeoutError: timed out"
