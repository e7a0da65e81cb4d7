"""Reading stacks: what a stack is and how its files become pixels.

Owns the 28 locations and four channels (`labels`), the rejection a file or stack gets
(`errors`), file hashes and the stack fingerprint (`digest`), file names -> stack id and
channel (`naming`), decoding and checking one channel file (`image`), one stack of four,
whole or a channel at a time (`stack`), the pixels a model is given (`preprocess`), cheap
image-quality figures and checks (`quality`), the memory the decode threads share (`budget`),
its measurement (`memory`, a command) and giving freed memory back (`heap`). The bottom
room: it may import numpy, OpenCV and the standard library, and nothing else of the project.
"""
