"""The offline demo VLM: a small LLaVA with a word-level tokenizer, trained here on easy-vqa."""
