"""llama.cpp's ``convert_hf_to_gguf.py`` on a model whose tokenizer is SentencePiece-style BPE
given only as ``tokenizer.json`` (llmpress's gemma3-270m folder, converted from a GGUF, has no
``tokenizer.model``), with the tokenizer metadata llmpress's export writes.

Without a ``tokenizer.model`` the converter takes such a tokenizer for byte-level BPE (its
``_set_vocab_gpt2``, which refuses a pre-tokenizer it does not recognize, and would write a
``gpt2`` vocabulary llama.cpp splits differently). Here that one method writes llmpress's
``llama`` vocabulary instead (:mod:`llmpress.export.gguf_vocab`: tokens, scores, types, special
ids, BOS added); tensors and every other key are the converter's own. So the F32 file the
benchmark quantizes with llama.cpp and llmpress's files split text alike.

    python benchmarks/llamacpp_convert.py LLAMA_CPP_SRC MODEL_DIR --outtype f32 --outfile F32.gguf
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path


def main() -> None:
    src, args = Path(sys.argv[1]), sys.argv[2:]
    sys.path[:0] = [str(src), str(src / "gguf-py")]
    from conversion.base import TextModel

    from llmpress.export.gguf_vocab import add_tokenizer, tokenizer_metadata

    def set_vocab_llmpress(self) -> None:
        n_vocab = int(self.hparams["vocab_size"])
        tok = tokenizer_metadata(Path(self.dir_model), n_vocab)
        if tok["model"] != "llama":
            raise SystemExit(f"{self.dir_model}: a byte-level BPE tokenizer: run convert_hf_to_gguf.py itself")
        add_tokenizer(self.gguf_writer, Path(self.dir_model), tok, n_vocab, add_bos=True)

    TextModel._set_vocab_gpt2 = set_vocab_llmpress
    script = src / "convert_hf_to_gguf.py"
    sys.argv = [str(script), *args]
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
