"""The course room: what the notebooks teach with, beside the toolkit they teach.

The toolkit (`tutor.*`) is what a user copies into a project; this subpackage holds what only
the course needs, and imports the toolkit, never the other way round:

    lab, checks, exercises_*   the exercises of every notebook and the `tutor lab` command
    attention_cost             one attention layer measured per backend (notebook 09)
    zero                       DeepSpeed ZeRO memory per GPU on top of tutor.memory (notebook 09)
    tiny_model                 a random two-layer Llama with the bundled tokenizer (09, tests)
    chat_widget                a chat box for notebooks over tutor.chat.ChatSession (08)
"""
