"""The chat box of an interactive stage 05: the served model answering in the notebook, streamed."""

from __future__ import annotations

from ftkit.host.client import api_key, client_for


def chat_box(server, cfg):
    """An ipywidgets chat box streaming replies from the running server (interactive use only)."""
    import ipywidgets as widgets

    client = client_for(server, api_key(cfg))
    model_id = client.models.list().data[0].id
    history = [{"role": "system", "content": cfg.convert.system_prompt}] if cfg.convert.system_prompt else []
    box = widgets.Text(placeholder="Ask the fine-tuned model…", layout=widgets.Layout(width="70%"))
    send = widgets.Button(description="Send")
    out = widgets.Output(layout=widgets.Layout(border="1px solid #ddd", padding="6px"))

    def on_send(_):
        text, box.value = box.value.strip(), ""
        if not text:
            return
        history.append({"role": "user", "content": text})
        with out:
            print(f"you: {text}\nmodel: ", end="")
            pieces = []
            for chunk in client.chat.completions.create(model=model_id, messages=history, stream=True,
                                                        max_tokens=cfg.evaluate.max_new_tokens):
                delta = chunk.choices[0].delta.content if chunk.choices else None
                if delta:
                    pieces.append(delta)
                    print(delta, end="", flush=True)
            print("\n")
        history.append({"role": "assistant", "content": "".join(pieces)})

    send.on_click(on_send)
    chat = widgets.VBox([widgets.HBox([box, send]), out])
    chat.history = history  # the conversation so far (what the next request sends)
    return chat
