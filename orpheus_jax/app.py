"""The web demo: the seed's Hugging Face Space ("OrpheusGPT") in Gradio, streaming from our sampler.

One Sampler (batch 1, one device) is built and compiled at start; every request reuses it, so no
request compiles. Requests run side by side (up to CONCURRENCY at once, the rest queue): each has its
own decode state and its own random key, so each browser session gets its own text. Gradio is
imported only here (requirements-app.txt); analytics are off and the theme uses system fonts, so
neither start nor use makes a request beyond this machine.
"""

import os
import secrets

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # read when gradio is imported
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import jax  # noqa: E402

from orpheus_jax import OrpheusError  # noqa: E402
from orpheus_jax.cli.sample import DRAFT_LEN  # noqa: E402
from orpheus_jax.sampler import Sampler  # noqa: E402
from orpheus_jax.sharding import make_mesh  # noqa: E402

TITLE = "OrpheusGPT"
DESCRIPTION = "A simple GPT large language model trained on Homer's Iliad."
MAX_CHARS = 2000
DEFAULT_CHARS = 200
CHUNK = 8  # characters per decode call: how often the page's text grows
CONCURRENCY = 4


class InputError(ValueError):
    """Bad input from the page: shown there, never a crash."""


class TextStreamer:
    """The demo's generation: checks a request, then yields prompt + text so far, chunk by chunk.

    Speculative decoding (draft_len > 0: the text sample.py's --draft ngram gives, sooner) drafts from
    draft_index, the run's drafts.npz (None: from the prompt and text so far alone)."""

    def __init__(self, run, chunk: int = CHUNK, draft_len: int = DRAFT_LEN, draft_index=None):
        self.tokenizer = run.tokenizer
        mesh = make_mesh(jax.devices()[:1])  # batch 1: one device; replicating it would only repeat the work
        self.sampler = Sampler(
            run.model_cfg, run.params, batch_size=1, chunk=chunk, prng_impl=run.cfg.prng_impl, mesh=mesh,
            draft_len=draft_len, draft_index=draft_index,
        )  # fmt: skip
        # Compile every program now, so that no request compiles: prefill (refills too), decode (the
        # first chunk) and speculate (the next).
        for _ in self.sampler.generate([0], 2 * chunk):
            pass

    def check(self, prompt, length, temperature, top_k, top_p):
        """The prompt's token ids and the settings as numbers, or InputError saying what is wrong."""
        if not prompt:
            raise InputError("Type a prompt first: the text to continue.")
        try:
            ids = self.tokenizer.encode(prompt)
        except OrpheusError as e:
            raise InputError(
                f"The prompt has {e}; the model knows only the characters of its training text."
            ) from None
        try:
            length, temperature, top_k, top_p = int(length), float(temperature), int(top_k), float(top_p)
        except (TypeError, ValueError):
            raise InputError("The settings must be numbers.") from None
        if not 1 <= length <= MAX_CHARS:
            raise InputError(
                f"The number of characters to generate must be between 1 and {MAX_CHARS}, got {length}."
            )
        if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
            raise InputError("Temperature and top-k must be >= 0, and top-p in (0, 1].")
        return ids, length, temperature, top_k, top_p

    def stream(self, prompt, length=DEFAULT_CHARS, temperature=1.0, top_k=0, top_p=1.0, seed=None):
        ids, length, temperature, top_k, top_p = self.check(prompt, length, temperature, top_k, top_p)
        seed = secrets.randbelow(2**31) if seed is None else seed
        text = prompt
        yield text
        for tokens_Bn in self.sampler.generate(ids, length, seed, [0], temperature, top_k, top_p):
            text += self.tokenizer.decode(tokens_Bn[0])
            yield text


def build_demo(streamer: TextStreamer):
    """The Gradio interface: the Space's inputs and output, plus temperature, top-k and top-p."""
    import gradio as gr

    def generate(prompt, length, temperature, top_k, top_p):
        try:
            yield from streamer.stream(prompt, length, temperature, top_k, top_p)
        except InputError as e:
            raise gr.Error(str(e), print_exception=False) from None

    vocab = streamer.tokenizer.vocab_size
    return gr.Interface(
        fn=generate,
        inputs=[
            gr.Textbox(label="Prompt", placeholder="Sing, O goddess, the anger of Achilles", lines=2),
            gr.Slider(1, MAX_CHARS, value=DEFAULT_CHARS, step=1, label="Number of characters to generate"),
        ],
        additional_inputs=[
            gr.Slider(
                0.0,
                2.0,
                value=1.0,
                step=0.05,
                label="Temperature",
                info="0: always the most likely character",
            ),
            gr.Slider(
                0, vocab, value=0, step=1, label="Top-k", info="keep the k most likely characters (0: all)"
            ),
            gr.Slider(
                0.01,
                1.0,
                value=1.0,
                step=0.01,
                label="Top-p",
                info="keep the smallest set holding this probability",
            ),
        ],
        outputs=gr.Textbox(label="Generated Text", lines=12, max_lines=40),
        title=TITLE,
        description=DESCRIPTION,
        flagging_mode="never",
        api_name="generate",
        concurrency_limit=CONCURRENCY,
        analytics_enabled=False,
    )


def launch(demo, host: str | None, port: int | None) -> None:
    import gradio as gr

    # System fonts: the default theme's are served by Gradio itself, but a font list keeps any
    # theme change from reaching for Google Fonts.
    theme = gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "Consolas", "monospace"]
    )
    demo.launch(
        server_name=host,
        server_port=port,
        theme=theme,
        ssr_mode=False,
        pwa=False,
        mcp_server=False,
        share=False,
        show_error=True,
    )
