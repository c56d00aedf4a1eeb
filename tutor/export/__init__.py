"""Export: a merged model → one GGUF file that llama.cpp, Ollama and LM Studio run.

- `tutor.export.writer`: the tensors and hyper-parameters (`export_model`), and `tutor
  export` end to end (`export_gguf`: merge an adapter first, write, check, Modelfile);
- `tutor.export.vocab`: the tokenizer half of the file;
- `tutor.export.check`: a GGUF file read back (header, tokenizer, model) and compared
  with its source;
- `tutor.export.modelfile`: the Ollama Modelfile, the chat template in Go-template syntax.
"""

from tutor.export.check import check_export, check_gguf, compare, gguf_tokenizer, load_gguf
from tutor.export.modelfile import write_modelfile
from tutor.export.writer import TYPES, ExportReport, export_gguf, export_model, unpermute_rows

__all__ = ["TYPES", "ExportReport", "check_export", "check_gguf", "compare", "export_gguf",
           "export_model", "gguf_tokenizer", "load_gguf", "unpermute_rows", "write_modelfile"]
