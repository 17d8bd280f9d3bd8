"""The shipped API workflows (workflows/api/*_api.json) filled in for one run: model names, prompts,
sizes, steps. Plain dict edits on ComfyUI's API format; nothing here imports ComfyUI."""
import copy
import json
import struct
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
API_WORKFLOWS = ROOT / "workflows" / "api"
WORKFLOW = API_WORKFLOWS / "edlora_txt2img_api.json"
TRAIN_WORKFLOW = API_WORKFLOWS / "edlora_train_api.json"
FUSION_WORKFLOW = API_WORKFLOWS / "fuse_three_concepts_api.json"
REGIONAL_WORKFLOW = API_WORKFLOWS / "regional_two_concepts_api.json"


def load_workflow(path=WORKFLOW):
    with open(path) as f:
        return json.load(f)


def only_node(graph, class_type):
    ids = [k for k, v in graph.items() if v["class_type"] == class_type]
    if len(ids) != 1:
        raise ValueError(f"workflow: expected one {class_type} node, found {len(ids)}")
    return ids[0]


def _is_link(value):
    return isinstance(value, list) and len(value) == 2


def _references(graph, node_id):
    """[(node, input name)] of every input linked to node_id's outputs."""
    return [(node, key) for node in graph.values() for key, value in node["inputs"].items()
            if _is_link(value) and value[0] == node_id]


def _relink(graph, old_ids, new_id):
    for node in graph.values():
        for key, value in node["inputs"].items():
            if _is_link(value) and value[0] in old_ids:
                node["inputs"][key] = [new_id, value[1]]


def set_sampling(graph, prompt=None, negative=None, width=None, height=None, steps=None, seed=None,
                 image_prefix=None):
    """Fills in the KSampler's prompts, size, steps and seed and the SaveImage prefix (None keeps
    the workflow's value)."""
    sampler = graph[only_node(graph, "KSampler")]["inputs"]
    for text, link in ((prompt, sampler["positive"]), (negative, sampler["negative"])):
        if text is not None:
            graph[link[0]]["inputs"]["text"] = text
    latent = graph[only_node(graph, "EmptyLatentImage")]["inputs"]
    for inputs, key, value in ((latent, "width", width), (latent, "height", height),
                               (sampler, "steps", steps), (sampler, "seed", seed)):
        if value is not None:
            inputs[key] = value
    if image_prefix is not None:
        graph[only_node(graph, "SaveImage")]["inputs"]["filename_prefix"] = image_prefix
    return graph


def positive_text(graph):
    sampler = graph[only_node(graph, "KSampler")]["inputs"]
    return graph[sampler["positive"][0]]["inputs"]["text"]


def build_prompt(workflow, checkpoint, edloras, prompt=None, negative=None, width=None, height=None,
                 steps=None, seed=None, filename_prefix=None):
    """The txt2img workflow with the model names and settings filled in. Several ED-LoRAs are
    applied by chaining loaders (a plain LoRA sum, fine for trying one concept at a time)."""
    graph = copy.deepcopy(workflow)
    graph[only_node(graph, "CheckpointLoaderSimple")]["inputs"]["ckpt_name"] = checkpoint
    loader_id = only_node(graph, "MixOfShowEDLoRALoader")
    graph[loader_id]["inputs"]["edlora_name"] = edloras[0]
    last = loader_id
    for index, name in enumerate(edloras[1:], start=1):
        node_id = f"{loader_id}_{index}"
        graph[node_id] = copy.deepcopy(graph[loader_id])
        graph[node_id]["inputs"].update(model=[last, 0], clip=[last, 1], edlora_name=name)
        last = node_id
    if last != loader_id:  # everything downstream of the first loader uses the last
        chained = {k: v for k, v in graph.items() if v["class_type"] == "MixOfShowEDLoRALoader"}
        rest = {k: v for k, v in graph.items() if k not in chained}
        _relink(rest, {loader_id}, last)
    return set_sampling(graph, prompt, negative, width, height, steps, seed, filename_prefix)


def build_train_prompt(workflow, checkpoint, dataset_folder, words, initializers, output_name, masks_folder="",
                       steps=None, batch_size=None, resolution=None, caption_template=None, preview_steps=None,
                       seed=None, preview_prefix=None):
    """The EDLoRA Train workflow for one concept: its dataset, two words and their initialisers,
    the output name and (None keeps the workflow's value) the training settings."""
    graph = copy.deepcopy(workflow)
    graph[only_node(graph, "CheckpointLoaderSimple")]["inputs"]["ckpt_name"] = checkpoint
    train = graph[only_node(graph, "MixOfShowEDLoRATrain")]["inputs"]
    train.update(dataset_folder=str(dataset_folder), masks_folder=str(masks_folder or ""), output_name=output_name,
                 concept_word_1=words[0], concept_word_2=words[1],
                 initializer_1=initializers[0], initializer_2=initializers[1])
    settings = dict(steps=steps, batch_size=batch_size, resolution=resolution, caption_template=caption_template,
                    preview_steps=preview_steps, seed=seed)
    train.update({key: value for key, value in settings.items() if value is not None})
    if preview_prefix is not None:
        graph[only_node(graph, "SaveImage")]["inputs"]["filename_prefix"] = preview_prefix
    return graph


def reported_files(entry, graph, class_type):
    """The file names a saving node (EDLoRA Train, Save Fused Model) showed, from a finished
    prompt's history entry; Save Fused Model's are relative to the models folder."""
    names = entry.get("outputs", {}).get(only_node(graph, class_type), {}).get("text", [])
    if not names:
        raise ValueError(f"{class_type} reported no file: {entry.get('outputs')}")
    return list(names)


def concept_chain(graph):
    """The EDLoRA Concept node ids feeding the Gradient Fuse node, first concept first."""
    chain, node_id = [], graph[only_node(graph, "MixOfShowGradientFuse")]["inputs"]["concepts"][0]
    while node_id is not None:
        if graph[node_id]["class_type"] != "MixOfShowEDLoRAConcept":
            raise ValueError(f"workflow: node {node_id} feeds the concept chain but is no EDLoRA Concept")
        chain.insert(0, node_id)
        linked = graph[node_id]["inputs"].get("concepts")
        node_id = linked[0] if linked else None
    return chain


def replace_words(text, replacements):
    for old, new in replacements.items():
        text = text.replace(old, new)
    return text


def build_fusion_prompt(workflow, checkpoint, edloras, prompt=None, negative=None, width=None, height=None,
                        steps=None, seed=None, capture_steps=None, capture_resolution=None, method=None,
                        filename_prefix=None, image_prefix=None):
    """The fusion workflow with one EDLoRA Concept node per file in `edloras` (the chain is
    cut or extended as needed) and the settings filled in."""
    if not edloras:
        raise ValueError("fusion needs at least one ED-LoRA")
    graph = copy.deepcopy(workflow)
    graph[only_node(graph, "CheckpointLoaderSimple")]["inputs"]["ckpt_name"] = checkpoint
    chain = concept_chain(graph)
    template = graph[chain[0]]
    ids = chain[:len(edloras)] + [f"{chain[-1]}_{i}" for i in range(1, len(edloras) - len(chain) + 1)]
    for node_id in chain[len(edloras):]:
        del graph[node_id]
    for index, (node_id, name) in enumerate(zip(ids, edloras)):
        node = copy.deepcopy(graph.get(node_id, template))
        node["inputs"].update(edlora_name=name, rename="")
        node["inputs"].pop("concepts", None)
        if index:
            node["inputs"]["concepts"] = [ids[index - 1], 0]
        node.setdefault("_meta", {})["title"] = f"EDLoRA Concept ({name})"
        graph[node_id] = node
    fuse = graph[only_node(graph, "MixOfShowGradientFuse")]["inputs"]
    fuse["concepts"] = [ids[-1], 0]
    for key, value in (("capture_steps", capture_steps), ("capture_resolution", capture_resolution),
                       ("method", method), ("seed", seed)):
        if value is not None:
            fuse[key] = value
    save = graph[only_node(graph, "MixOfShowSaveFusedModel")]["inputs"]
    if method not in (None, "gradient"):  # only gradient fusion has statistics to save
        save.pop("fusion_stats", None)
    if filename_prefix is not None:
        save["filename_prefix"] = filename_prefix
    return set_sampling(graph, prompt, negative, width, height, steps, seed, image_prefix)


def build_regional_prompt(workflow, fused_checkpoint, words=None, controlnet=None, pose=None, width=None,
                          height=None, steps=None, seed=None, filename_prefix=None):
    """The regional workflow sampling with a fused checkpoint: its checkpoint and ED-LoRA
    loaders become one Load Fused Model node (same output slots: MODEL, CLIP, VAE). `words`
    maps the workflow's concept words ('<cat1> <cat2>') to others in every prompt. Without
    `controlnet` the keypose nodes are bypassed (regions without a pose)."""
    graph = copy.deepcopy(workflow)
    removed = {k for k, v in graph.items() if v["class_type"] in ("CheckpointLoaderSimple", "MixOfShowEDLoRALoader")}
    fused_id = only_node(graph, "CheckpointLoaderSimple")
    for node_id in removed:
        del graph[node_id]
    _relink(graph, removed, fused_id)
    graph[fused_id] = {"class_type": "MixOfShowLoadFusedModel", "inputs": {"ckpt_name": fused_checkpoint},
                       "_meta": {"title": "Load Fused Model"}}
    for node in graph.values():
        for key in ("text", "prompt"):
            if isinstance(node["inputs"].get(key), str) and words:
                node["inputs"][key] = replace_words(node["inputs"][key], words)
    if controlnet is None:
        _bypass_controlnet(graph)
    else:
        graph[only_node(graph, "ControlNetLoader")]["inputs"]["control_net_name"] = controlnet
        if pose is not None:
            graph[only_node(graph, "LoadImage")]["inputs"]["image"] = pose
    return set_sampling(graph, width=width, height=height, steps=steps, seed=seed, image_prefix=filename_prefix)


def _bypass_controlnet(graph):
    """Drops the ControlNet apply node (its conditioning inputs go straight through) and the
    loaders only it used."""
    apply_id = only_node(graph, "ControlNetApplyAdvanced")
    apply = graph.pop(apply_id)
    for node, key in _references(graph, apply_id):
        node["inputs"][key] = apply["inputs"]["positive" if node["inputs"][key][1] == 0 else "negative"]
    for node_id in [k for k, v in graph.items() if v["class_type"] in ("ControlNetLoader", "LoadImage")]:
        if not _references(graph, node_id):
            del graph[node_id]


def region_labels(graph):
    """The first part of every Region Prompt's prompt, for messages."""
    return [n["inputs"]["prompt"].split(",")[0] for n in graph.values() if n["class_type"] == "MixOfShowRegionPrompt"]


def png_size(data):
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        raise ValueError("not a PNG")
    return struct.unpack(">II", data[16:24])
