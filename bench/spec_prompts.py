"""The prompt set of the speculative-decoding benchmarks (bench/spec_solo.py, bench/spec_split.py): 20 code
prompts (7 write, 7 complete, 6 edit: the edits repeat their input, where n-gram lookup drafts well) and 20 prose
prompts, each a single user turn asked at temperature 0."""

from __future__ import annotations

_PARSE = """def parse(lines):
    result = {}
    for line in lines:
        if not line.strip():
            continue
        key, _, value = line.partition("=")
        result[key.strip()] = value.strip()
    return result
"""
_STACK = """class Stack:
    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)

    def pop(self):
        return self.items.pop()

    def peek(self):
        return self.items[-1]
"""
_JS = """function total(cart) {
  let sum = 0;
  for (let i = 0; i < cart.length; i++) {
    sum = sum + cart[i].price * cart[i].qty;
  }
  return sum;
}
"""

CODE_WRITE = [
    "Write a Python function that returns the n-th Fibonacci number iteratively.",
    "Write a Python function that checks whether a string is a palindrome, ignoring case and punctuation.",
    "Write a JavaScript function that debounces another function by a given number of milliseconds.",
    "Write a SQL query that returns the ten customers with the highest total order value.",
    "Write a Python class for an LRU cache with get and put methods.",
    "Write a Bash script that counts the lines of every .py file in a directory tree.",
    "Write a Go function that reverses a slice of integers in place.",
]
CODE_COMPLETE = [
    'Complete this Python function:\ndef merge_sorted(a, b):\n    """Merge two sorted lists into one sorted list."""\n',
    "Complete this function:\ndef binary_search(xs, target):\n    lo, hi = 0, len(xs) - 1\n    while lo <= hi:\n",
    "Complete this Python code:\nimport json\n\ndef load_config(path):\n    with open(path) as f:\n",
    "Complete the Rust function:\nfn gcd(a: u64, b: u64) -> u64 {\n",
    "Complete this class:\nclass Vector2:\n    def __init__(self, x, y):\n        self.x = x\n"
    "        self.y = y\n\n    def __add__(self, other):\n",
    "Finish this TypeScript function:\nexport function chunk<T>(items: T[], size: number): T[][] {\n",
    'Complete this Python generator:\ndef primes():\n    """Yield prime numbers forever."""\n',
]
CODE_EDIT = [
    "Add type hints to this function and return the whole function:\n" + _PARSE,
    "Rename the variable result to config in this code and show the full code:\n" + _PARSE,
    "Add a docstring to every method of this class and show the whole class:\n" + _STACK,
    "Make pop and peek raise IndexError with a clear message when the stack is empty; show the whole class:\n" + _STACK,
    "Rewrite this function to use reduce, and show the full function:\n" + _JS,
    "Convert this JavaScript to TypeScript with types, keeping everything else the same:\n" + _JS,
]
PROSE = [
    "Explain in two paragraphs why the sky is blue.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Describe the water cycle for a ten-year-old.",
    "What are the main causes of the French Revolution?",
    "Write a polite email asking a colleague to review a document by Friday.",
    "Summarize the plot of Romeo and Juliet in a paragraph.",
    "Give five tips for sleeping better.",
    "Explain how a bicycle stays upright when it moves.",
    "Write a haiku sequence about autumn in a city.",
    "What is the difference between weather and climate?",
    "Describe a walk through a busy market in the morning.",
    "Explain what inflation is and how it affects savings.",
    "Write a product description for a handmade wooden chair.",
    "Why do cats purr? Answer in a few sentences.",
    "Give a brief history of the printing press.",
    "Write a motivational speech for a school sports team before a final.",
    "Explain photosynthesis in simple terms.",
    "Describe the life of a honeybee colony through one year.",
    "What makes a good teacher? Give your view in a paragraph.",
    "Write a letter from a traveller to a friend back home, describing the mountains.",
]
CODE = CODE_WRITE + CODE_COMPLETE + CODE_EDIT
assert len(CODE) == 20 and len(PROSE) == 20
