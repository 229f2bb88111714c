"""The Ollama Modelfile's Go template is derived from the Jinja chat template and renders the same text on probe
chats; templates it cannot express get no TEMPLATE line and say why."""

from pathlib import Path

import pytest

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tok(tiny_model: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def test_chatml_with_default_system(tok) -> None:  # type: ignore[no-untyped-def]
    from finetune_pipeline.release.gguf_export import serving_template
    from finetune_pipeline.release.modelfile import chat_shape, modelfile
    from finetune_pipeline.training.templates import CHATML_SMOL, SMOLLM2_SYSTEM

    template = serving_template(CHATML_SMOL)
    shape = chat_shape(tok, template)
    assert shape.system == SMOLLM2_SYSTEM
    chat = [{"role": "user", "content": "Where is my invoice?"}, {"role": "assistant", "content": "{}"}]
    chat.append({"role": "user", "content": "And the refund?"})
    want = tok.apply_chat_template(chat, chat_template=template, tokenize=False, add_generation_prompt=True)
    assert shape.render(chat) == want
    text = modelfile(tok, template, "model-q80.gguf", "<|im_end|>", 48, "m v1")
    assert "FROM ./model-q80.gguf" in text and 'PARAMETER stop "<|im_end|>"' in text
    assert (
        '{{ range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"""'
        in text
    )
    assert f'SYSTEM """{SMOLLM2_SYSTEM}"""' in text


def test_template_without_go_form_is_explained(tok) -> None:  # type: ignore[no-untyped-def]
    from finetune_pipeline.release.gguf_export import serving_template
    from finetune_pipeline.release.modelfile import modelfile
    from finetune_pipeline.training.templates import MISTRAL

    text = modelfile(tok, serving_template(MISTRAL), "m.gguf", "</s>", 16, "m")
    assert "TEMPLATE" not in text.replace("# no TEMPLATE", "") and "# no TEMPLATE:" in text
