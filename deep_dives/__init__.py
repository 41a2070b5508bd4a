"""Deep dives: ideas beyond the lesson that its files call on, each read on its own after it: byte-level BPE
(utils.py's other tokenizers), the Muon optimizer (optim.py), beam search (generate.py --beam) and decoding
replayed from a CUDA graph (sampling.py on a GPU). They import only the lesson and config.py, never machinery/."""
