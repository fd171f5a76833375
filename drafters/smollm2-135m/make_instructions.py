"""Write the drafter's training prompts:

- general_prompts.jsonl: the GSM8K training questions the drafter was first trained on, then non-math instructions
  written for this project (Python functions to complete, code requests, explanations, writing, advice,
  comparisons);
- broad_prompts.jsonl: the first 500 of those GSM8K questions, the same instructions, then more: a Python stub to
  complete for public functions of Python's own standard library (signature and the first paragraph of the
  docstring, read from the stdlib sources of the Python running this; the committed file came from 3.11.7) and the
  instruction lists below asked in new ways.

Deterministic for a given Python: rerunning writes the same files. None of it comes from a benchmark prompt set
(HumanEval, MBPP, MT-Bench, AlpacaEval); tests/test_training_data.py checks that no line shares a prompt with them.

    python drafters/smollm2-135m/make_instructions.py
"""

import ast
import json
import random
import sysconfig
from pathlib import Path

HERE = Path(__file__).parent
GSM8K_TRAINED = 1248  # the questions of answers.jsonl; their answers are reused, not regenerated
GSM8K_BROAD = 500  # how many of them the broad phase keeps, so that math stays a minority of it

# (signature, one-line description, example call, example result): completed as a HumanEval-style stub
FUNCTIONS = [
    ("count_vowels(text: str) -> int", "Return how many vowels (a, e, i, o, u, either case) the text contains.",
     "count_vowels('Hello World')", "3"),
    ("reverse_words(sentence: str) -> str", "Return the sentence with its words in reverse order.",
     "reverse_words('the quick fox')", "'fox quick the'"),
    ("is_palindrome(text: str) -> bool", "Check whether the text reads the same forwards and backwards, ignoring "
     "case and spaces.", "is_palindrome('Never odd or even')", "True"),
    ("running_total(values: List[int]) -> List[int]", "Return the running sums of the list.",
     "running_total([1, 2, 3, 4])", "[1, 3, 6, 10]"),
    ("second_largest(values: List[int]) -> int", "Return the second largest distinct value of the list.",
     "second_largest([4, 1, 7, 7, 3])", "4"),
    ("merge_sorted(a: List[int], b: List[int]) -> List[int]", "Merge two sorted lists into one sorted list.",
     "merge_sorted([1, 4, 9], [2, 3, 10])", "[1, 2, 3, 4, 9, 10]"),
    ("chunk(values: List[int], size: int) -> List[List[int]]", "Split the list into consecutive chunks of the "
     "given size; the last chunk may be shorter.", "chunk([1, 2, 3, 4, 5], 2)", "[[1, 2], [3, 4], [5]]"),
    ("flatten(nested: List[List[int]]) -> List[int]", "Flatten a list of lists into one list.",
     "flatten([[1, 2], [], [3]])", "[1, 2, 3]"),
    ("word_lengths(sentence: str) -> Dict[str, int]", "Map every word of the sentence to its length.",
     "word_lengths('a bb ccc')", "{'a': 1, 'bb': 2, 'ccc': 3}"),
    ("most_common_char(text: str) -> str", "Return the character that occurs most often; on a tie the one that "
     "comes first in the text.", "most_common_char('banana')", "'a'"),
    ("celsius_to_fahrenheit(degrees: float) -> float", "Convert a temperature from Celsius to Fahrenheit.",
     "celsius_to_fahrenheit(100.0)", "212.0"),
    ("digit_sum(number: int) -> int", "Return the sum of the decimal digits of a non-negative integer.",
     "digit_sum(4096)", "19"),
    ("is_prime(number: int) -> bool", "Check whether the number is prime.", "is_prime(29)", "True"),
    ("gcd(a: int, b: int) -> int", "Return the greatest common divisor of two positive integers.", "gcd(48, 18)",
     "6"),
    ("fibonacci(n: int) -> List[int]", "Return the first n Fibonacci numbers, starting 0, 1.", "fibonacci(7)",
     "[0, 1, 1, 2, 3, 5, 8]"),
    ("remove_duplicates(values: List[int]) -> List[int]", "Remove repeated values, keeping the first occurrence "
     "of each in order.", "remove_duplicates([3, 1, 3, 2, 1])", "[3, 1, 2]"),
    ("title_case(text: str) -> str", "Capitalize the first letter of every word and lower-case the rest.",
     "title_case('hELLO wORLD')", "'Hello World'"),
    ("count_words(text: str) -> Dict[str, int]", "Count how often each lower-cased word occurs.",
     "count_words('a b A')", "{'a': 2, 'b': 1}"),
    ("pairwise_differences(values: List[int]) -> List[int]", "Return the differences between neighbouring "
     "values.", "pairwise_differences([1, 4, 9, 16])", "[3, 5, 7]"),
    ("rotate(values: List[int], steps: int) -> List[int]", "Rotate the list to the right by the given number of "
     "steps.", "rotate([1, 2, 3, 4, 5], 2)", "[4, 5, 1, 2, 3]"),
    ("caesar_shift(text: str, shift: int) -> str", "Shift every lower-case letter forward in the alphabet by "
     "shift places, wrapping around; other characters stay.", "caesar_shift('xyz a', 2)", "'zab c'"),
    ("binary_to_int(bits: str) -> int", "Convert a string of 0s and 1s to the integer it represents.",
     "binary_to_int('1011')", "11"),
    ("int_to_roman(number: int) -> str", "Write a number between 1 and 3999 in Roman numerals.",
     "int_to_roman(1994)", "'MCMXCIV'"),
    ("longest_word(sentence: str) -> str", "Return the longest word; on a tie the first one.",
     "longest_word('I love programming puzzles')", "'programming'"),
    ("matrix_transpose(matrix: List[List[int]]) -> List[List[int]]", "Return the transpose of a rectangular "
     "matrix.", "matrix_transpose([[1, 2, 3], [4, 5, 6]])", "[[1, 4], [2, 5], [3, 6]]"),
    ("dot_product(a: List[float], b: List[float]) -> float", "Return the dot product of two vectors of the same "
     "length.", "dot_product([1.0, 2.0], [3.0, 4.0])", "11.0"),
    ("average(values: List[float]) -> float", "Return the arithmetic mean, or 0.0 for an empty list.",
     "average([2.0, 4.0, 9.0])", "5.0"),
    ("median(values: List[float]) -> float", "Return the median of a non-empty list.",
     "median([5.0, 1.0, 3.0, 2.0])", "2.5"),
    ("balanced_brackets(text: str) -> bool", "Check that every (, [ and { is closed in the right order.",
     "balanced_brackets('([]{})')", "True"),
    ("compress(text: str) -> str", "Run-length encode the text: each run of a character becomes the character "
     "and the run's length.", "compress('aaabcc')", "'a3b1c2'"),
    ("anagrams(a: str, b: str) -> bool", "Check whether two words are anagrams of each other, ignoring case.",
     "anagrams('Listen', 'Silent')", "True"),
    ("factorial(n: int) -> int", "Return n! for a non-negative integer n.", "factorial(6)", "720"),
    ("power_set(items: List[int]) -> List[List[int]]", "Return every subset of the list, the empty one first.",
     "len(power_set([1, 2, 3]))", "8"),
    ("clamp(value: float, low: float, high: float) -> float", "Limit the value to the range [low, high].",
     "clamp(12.5, 0.0, 10.0)", "10.0"),
    ("snake_to_camel(name: str) -> str", "Turn a snake_case name into camelCase.",
     "snake_to_camel('max_line_length')", "'maxLineLength'"),
    ("camel_to_snake(name: str) -> str", "Turn a camelCase name into snake_case.",
     "camel_to_snake('parseHttpHeader')", "'parse_http_header'"),
    ("count_islands(grid: List[List[int]]) -> int", "Count the groups of 1s connected horizontally or "
     "vertically.", "count_islands([[1, 0, 1], [1, 0, 0], [0, 0, 1]])", "3"),
    ("leap_year(year: int) -> bool", "Check whether the year is a leap year in the Gregorian calendar.",
     "leap_year(1900)", "False"),
    ("find_missing(values: List[int]) -> int", "The list holds the numbers 1 to n with one missing; return it.",
     "find_missing([1, 2, 4, 5])", "3"),
    ("max_subarray(values: List[int]) -> int", "Return the largest sum of a contiguous, non-empty sub-list.",
     "max_subarray([-2, 1, -3, 4, -1, 2, 1, -5, 4])", "6"),
    ("valid_ipv4(address: str) -> bool", "Check whether the string is a dotted IPv4 address with four numbers "
     "from 0 to 255.", "valid_ipv4('192.168.1.300')", "False"),
    ("group_by_length(words: List[str]) -> Dict[int, List[str]]", "Group the words by their length, keeping "
     "their order inside each group.", "group_by_length(['a', 'to', 'be', 'cat'])",
     "{1: ['a'], 2: ['to', 'be'], 3: ['cat']}"),
    ("seconds_to_clock(seconds: int) -> str", "Format a number of seconds as HH:MM:SS.",
     "seconds_to_clock(3725)", "'01:02:05'"),
    ("triangle_type(a: int, b: int, c: int) -> str", "Return 'equilateral', 'isosceles', 'scalene' or 'invalid' "
     "for the three side lengths.", "triangle_type(3, 4, 5)", "'scalene'"),
    ("unique_chars(text: str) -> bool", "Check whether no character occurs twice in the text.",
     "unique_chars('python')", "True"),
    ("nth_largest(values: List[int], n: int) -> int", "Return the n-th largest value (1 is the largest).",
     "nth_largest([9, 2, 7, 4], 2)", "7"),
    ("interleave(a: List[int], b: List[int]) -> List[int]", "Alternate the items of two lists; the rest of the "
     "longer list goes at the end.", "interleave([1, 2, 3], [10, 20])", "[1, 10, 2, 20, 3]"),
    ("mask_email(address: str) -> str", "Keep the first letter of the name part and replace the rest of it with "
     "asterisks.", "mask_email('alice@example.com')", "'a****@example.com'"),
    ("sum_of_squares(n: int) -> int", "Return 1² + 2² + ... + n².", "sum_of_squares(4)", "30"),
    ("window_max(values: List[int], width: int) -> List[int]", "Return the maximum of every window of the given "
     "width.", "window_max([1, 3, 2, 5, 4], 3)", "[3, 5, 5]"),
    ("parse_key_values(text: str) -> Dict[str, str]", "Parse 'key=value' pairs separated by semicolons.",
     "parse_key_values('a=1;b=two')", "{'a': '1', 'b': 'two'}"),
    ("count_bits(number: int) -> int", "Return how many 1 bits the binary form of a non-negative integer has.",
     "count_bits(13)", "3"),
    ("is_sorted(values: List[int]) -> bool", "Check whether the list is in non-decreasing order.",
     "is_sorted([1, 2, 2, 5])", "True"),
    ("common_prefix(words: List[str]) -> str", "Return the longest prefix all the words share.",
     "common_prefix(['flower', 'flow', 'flight'])", "'fl'"),
    ("hamming_distance(a: str, b: str) -> int", "Count the positions where two equally long strings differ.",
     "hamming_distance('karolin', 'kathrin')", "3"),
    ("triangle_numbers(n: int) -> List[int]", "Return the first n triangle numbers.", "triangle_numbers(5)",
     "[1, 3, 6, 10, 15]"),
    ("invert_dict(mapping: Dict[str, int]) -> Dict[int, str]", "Swap the keys and values of a dictionary whose "
     "values are unique.", "invert_dict({'a': 1, 'b': 2})", "{1: 'a', 2: 'b'}"),
    ("spiral_order(matrix: List[List[int]]) -> List[int]", "Return the matrix's values in clockwise spiral "
     "order.", "spiral_order([[1, 2], [3, 4]])", "[1, 2, 4, 3]"),
    ("even_indexed_sum(values: List[int]) -> int", "Return the sum of the values at even positions.",
     "even_indexed_sum([5, 1, 5, 1, 5])", "15"),
    ("capitalize_sentences(text: str) -> str", "Capitalize the first letter of every sentence.",
     "capitalize_sentences('hi. how are you? fine.')", "'Hi. How are you? Fine.'"),
]

CODE_TASKS = [
    "reads a CSV file and prints the average of its second column", "checks whether a string is a valid email "
    "address with a regular expression", "downloads nothing but simulates a dice game between two players",
    "implements a stack class with push, pop and peek", "implements a queue with two stacks", "sorts a list of "
    "dictionaries by their 'age' key", "counts the lines, words and characters of a text file", "implements "
    "binary search on a sorted list", "implements bubble sort and explains each pass", "finds all prime numbers "
    "below 100 with the sieve of Eratosthenes", "converts a list of temperatures from Fahrenheit to Celsius",
    "generates a random password of a given length", "merges two dictionaries, adding the values of shared keys",
    "finds the most frequent word in a paragraph", "reads a JSON file and prints its keys", "implements a linked "
    "list with insert and delete", "computes the factorial of a number recursively and iteratively", "prints a "
    "multiplication table from 1 to 10", "checks whether two strings are rotations of each other", "implements a "
    "simple bank account class with deposit and withdraw", "validates a Sudoku row, column and box", "turns a "
    "sentence into pig latin", "counts the frequency of each letter in a string", "implements a binary tree with "
    "in-order traversal", "finds duplicate files in a folder by their size and hash", "implements a to-do list "
    "that saves to a text file", "computes the distance between two points on a plane", "plays rock, paper, "
    "scissors against the computer", "converts a decimal number to binary without bin()", "finds the longest "
    "common subsequence of two strings", "memoizes a slow function with a dictionary", "implements a simple "
    "timer context manager", "parses command-line arguments with argparse", "retries a function three times "
    "when it raises an exception", "flattens an arbitrarily nested list", "implements a least-recently-used cache",
]
LANGUAGES = ["Python", "Python", "Python", "JavaScript", "C", "Java", "Go", "Rust"]
CODE_FORMS = ["Write a {lang} program that {task}.", "Write a {lang} function that {task}, with a short "
              "explanation.", "Show me how to write code in {lang} that {task}."]
CODE_QUESTIONS = [
    "What is the difference between a list and a tuple in Python?", "How do Python decorators work? Give an "
    "example.", "Explain what a closure is in JavaScript.", "What does the 'yield' keyword do in Python?",
    "Explain recursion with a simple example.", "What is the difference between a process and a thread?",
    "How does a hash table work?", "What is Big O notation? Give examples.", "Explain how git rebase differs from "
    "git merge.", "What is a REST API?", "How do I read a file line by line in Python?", "What are Python list "
    "comprehensions? Show three examples.", "Explain the difference between SQL INNER JOIN and LEFT JOIN.",
    "What is object-oriented programming?", "How do exceptions work in Python?", "What is the difference between "
    "== and 'is' in Python?", "Explain what a virtual environment is and why to use one.", "What is unit "
    "testing? Show a small pytest example.", "How does garbage collection work in Python?", "What is a lambda "
    "function in Python?", "Explain the map, filter and reduce functions.", "How do I sort a dictionary by value "
    "in Python?", "What is the difference between a shallow copy and a deep copy?", "What is a SQL index and "
    "when should I add one?", "Explain how HTTP cookies work.", "What is the difference between TCP and UDP?",
    "Explain what Docker containers are.", "How does async/await work in Python?", "What are type hints in "
    "Python?", "Explain the model-view-controller pattern.",
]

CONCEPTS = [
    "photosynthesis", "inflation", "the water cycle", "black holes", "compound interest", "the immune system",
    "plate tectonics", "supply and demand", "the greenhouse effect", "DNA", "electric circuits", "vaccines",
    "the Roman Empire's fall", "machine learning", "blockchain", "the theory of evolution", "gravity", "the "
    "stock market", "democracy", "the Industrial Revolution", "climate change", "the human heart", "volcanoes",
    "the internet", "renewable energy", "the French Revolution", "antibiotics", "the solar system", "sleep",
    "memory in the brain", "nuclear energy", "tides", "rainbows", "the printing press", "credit scores",
    "interest rates", "the placebo effect", "neural networks", "encryption", "the Renaissance", "ocean currents",
    "the speed of light", "earthquakes", "batteries", "the digestive system", "minimum wage", "opportunity cost",
    "the scientific method", "magnetism", "the Silk Road",
]
EXPLAIN_FORMS = ["Explain {c} in simple terms.", "Explain {c} to a ten-year-old.", "What is {c}, and why does "
                 "it matter?", "Give a short overview of {c} with three key facts."]

FORMS = ["a short poem", "a haiku", "a short story", "a limerick", "a persuasive paragraph", "a product "
         "description", "a short speech", "a diary entry", "a news headline and summary", "a friendly letter"]
TOPICS = ["autumn leaves", "a lost umbrella", "the first day at a new job", "a robot learning to paint", "a "
          "rainy city", "a cup of coffee", "friendship", "the ocean at night", "a mountain hike", "an old "
          "library", "a reusable water bottle", "a cat who hates Mondays", "a garden in spring", "a train "
          "journey", "learning to cook", "a lighthouse keeper", "the moon", "a busy market", "a snow day",
          "a forgotten birthday"]
EMAILS = ["ask my manager for a day off next Friday", "thank a colleague for helping with a project", "apologize "
          "to a customer for a late delivery", "invite my team to a lunch on Thursday", "ask a professor for an "
          "extension on an essay", "follow up after a job interview", "decline a meeting politely", "remind a "
          "client about an unpaid invoice", "welcome a new employee to the team", "ask a landlord to fix a "
          "leaking tap"]
HOW_TO = [
    "improve my sleep", "start running as a beginner", "save money on groceries", "learn a new language", "write "
    "a good resume", "prepare for a job interview", "make a simple budget", "grow tomatoes on a balcony",
    "reduce stress at work", "study for an exam", "make friends in a new city", "keep houseplants alive", "cook "
    "rice on the stove", "change a flat bicycle tire", "start a small online business", "become a better public "
    "speaker", "organize my closet", "stay focused while working from home", "learn to play the guitar", "plan a "
    "road trip", "write a short story", "negotiate a higher salary", "make homemade bread", "clean a laptop "
    "keyboard", "back up my computer", "choose a good password", "train a puppy to sit", "meditate", "read more "
    "books", "give useful feedback to a coworker",
]
HOW_FORMS = ["How can I {t}?", "Give me step-by-step tips to {t}.", "What is the best way to {t}?"]
PAIRS = [
    ("a virus", "a bacterium"), ("weather", "climate"), ("stocks", "bonds"), ("a crocodile", "an alligator"),
    ("baking soda", "baking powder"), ("a comet", "an asteroid"), ("RAM", "storage"), ("a lake", "a pond"),
    ("mitosis", "meiosis"), ("a democracy", "a republic"), ("speed", "velocity"), ("tea", "coffee"),
    ("renting", "buying a home"), ("a laptop", "a desktop computer"), ("cats", "dogs as pets"), ("AC", "DC "
    "current"), ("a simile", "a metaphor"), ("an LLC", "a sole proprietorship"), ("Python", "JavaScript"),
    ("frogs", "toads"),
]
LISTS = [
    "healthy breakfast ideas", "ways to save energy at home", "tips for a first-time traveler abroad", "classic "
    "novels worth reading", "fun activities for a rainy day", "questions to ask in a job interview", "habits of "
    "productive people", "ways to reduce plastic waste", "indoor plants that need little light", "board games "
    "for a family night", "ideas for a birthday party", "exercises that need no equipment", "reasons to learn "
    "history", "things to pack for a camping trip", "ways to be kinder to yourself", "benefits of walking every "
    "day", "easy dinners for a busy week", "ways to practice gratitude", "common mistakes new programmers make",
    "skills every manager needs",
]


def stub(signature: str, description: str, call: str, result: str) -> str:
    typing = [name for name in ("List", "Dict") if name + "[" in signature]
    header = f"from typing import {', '.join(typing)}\n\n\n" if typing else ""
    return f'{header}def {signature}:\n    """ {description}\n    >>> {call}\n    {result}\n    """\n'


def instructions() -> list[str]:
    rng = random.Random(0)
    rows = [stub(*f) for f in FUNCTIONS]
    rows += [f"Complete this Python function:\n\n{stub(*f)}" for f in FUNCTIONS]
    rows += [rng.choice(CODE_FORMS).format(lang=rng.choice(LANGUAGES), task=task) for task in CODE_TASKS]
    rows += [form.format(lang="Python", task=task) for task in CODE_TASKS for form in CODE_FORMS[:1]]
    rows += CODE_QUESTIONS
    rows += [form.format(c=c) for c in CONCEPTS for form in rng.sample(EXPLAIN_FORMS, 2)]
    rows += [f"Write {form} about {topic}." for form in FORMS for topic in rng.sample(TOPICS, 6)]
    rows += [f"Write an email to {purpose}." for purpose in EMAILS]
    rows += [form.format(t=t) for t in HOW_TO for form in rng.sample(HOW_FORMS, 2)]
    rows += [f"What is the difference between {a} and {b}?" for a, b in PAIRS]
    rows += [f"Compare {a} and {b} in a short table." for a, b in PAIRS[:10]]
    rows += [f"List {n} {what}." for what in LISTS for n in rng.sample(["five", "seven", "ten"], 1)]
    return rows


# Standard-library modules whose public functions become stubs to complete (at most PER_MODULE each, so that no
# module's style dominates). Code a model is asked to write, phrased as HumanEval-style stubs without their prompts.
STDLIB = ["textwrap", "string", "statistics", "heapq", "bisect", "colorsys", "fnmatch", "shlex", "base64", "difflib",
          "calendar", "posixpath", "ntpath", "glob", "html/__init__", "urllib/parse", "csv", "fractions",
          "ipaddress", "email/utils", "quopri", "random", "functools", "operator", "copy", "pprint", "reprlib",
          "secrets", "shutil", "tempfile", "uuid", "zipfile", "tarfile", "gzip", "json/__init__", "datetime",
          "locale", "gettext", "mimetypes", "platform", "inspect", "dis", "tokenize", "ast", "typing",
          "dataclasses", "enum", "contextlib", "logging/__init__", "os", "subprocess", "socket", "ssl",
          "http/cookies", "wsgiref/util", "xml/sax/saxutils", "webbrowser", "hashlib", "codecs", "graphlib",
          "pydoc", "traceback", "warnings", "linecache", "doctest", "unittest/util", "filecmp", "stat", "plistlib",
          "email/header", "email/quoprimime", "getopt", "codeop", "pkgutil", "sysconfig", "turtle", "token",
          "lib2to3/fixer_util", "idlelib/format"]
PER_MODULE = 12
STUB_FORMS = ["{stub}", "Complete this Python function:\n\n{stub}", "Write a Python function `{name}({args})`. "
              "{doc}", "Implement the following function in Python and explain how it works.\n\n{stub}"]


def stdlib_functions() -> list[tuple[str, str, str]]:
    """(name, arguments, first docstring paragraph) of public top-level functions with a docstring of 30–400
    characters and at least one argument."""
    lib, found = Path(sysconfig.get_paths()["stdlib"]), []
    for module in STDLIB:
        tree = ast.parse((lib / f"{module}.py").read_text(encoding="utf-8", errors="replace"))
        kept = []
        for node in tree.body:
            doc = ast.get_docstring(node) if isinstance(node, ast.FunctionDef) else None
            if doc and not node.name.startswith("_") and node.args.args:
                paragraph = " ".join(doc.strip().split("\n\n")[0].split())
                if 30 <= len(paragraph) <= 400:
                    kept.append((node.name, ast.unparse(node.args), paragraph))
        found += kept[:PER_MODULE]
    return found


def code_stubs() -> list[str]:
    rng = random.Random(1)
    rows = []
    for name, args, doc in stdlib_functions():
        stub = f'def {name}({args}):\n    """{doc}\n    """\n'
        rows.append(rng.choice(STUB_FORMS).format(stub=stub, name=name, args=args, doc=doc))
    return rows


# The lists above asked in new ways (the broad phase): other forms for the same subjects.
MORE_EXPLAIN = ["Write a short essay about {c}.", "What are common misconceptions about {c}?", "Summarize the "
                "history of {c} in a few paragraphs.", "Write five quiz questions about {c}, with answers.",
                "How would you teach {c} to a high-school class?"]
MORE_HOW = ["I want to {t}. Where should I start?", "Write a one-week plan to {t}.", "What mistakes should I avoid "
            "when I try to {t}?"]
MORE_WRITING = ["Write {form} about {topic} in the style of a children's book.", "Write {form} about {topic} "
                "that ends with a surprise.", "Rewrite this title as {form}: {topic}."]
ROLES = ["a travel guide in Rome", "a personal trainer", "a patient math tutor", "a chef in a busy kitchen",
         "a museum curator", "a customer support agent for a phone company", "a detective in the 1920s", "a "
         "librarian", "a career coach", "a park ranger", "a ship's captain", "a software architect", "a "
         "gardener", "a history teacher", "a nutritionist", "a startup founder pitching an idea", "a tour guide "
         "on Mars", "a medieval blacksmith", "a wildlife photographer", "a kindergarten teacher"]
ROLE_FORMS = ["Pretend you are {r}. Introduce yourself and describe a typical day.", "You are {r}. Answer my "
              "first question: what do you enjoy most about your work?"]


def more_instructions() -> list[str]:
    rng = random.Random(2)
    rows = [form.format(c=c) for c in CONCEPTS for form in rng.sample(MORE_EXPLAIN, 2)]
    rows += [form.format(t=t) for t in HOW_TO for form in rng.sample(MORE_HOW, 2)]
    rows += [rng.choice(MORE_WRITING).format(form=form, topic=topic) for form in FORMS
             for topic in rng.sample(TOPICS, 4)]
    rows += [form.format(r=r) for r in ROLES for form in ROLE_FORMS]
    rows += [f"Write a {lang} program that {task}." for task in CODE_TASKS for lang in rng.sample(LANGUAGES[2:], 1)]
    rows += [f"Write an email to {purpose}, in a formal tone." for purpose in EMAILS]
    rows += [f"Which is better for a beginner, {a} or {b}? Explain." for a, b in PAIRS[10:]]
    return rows


def write(name: str, lines: list[str]) -> None:
    (HERE / name).write_text("".join(line + "\n" for line in lines))


def main() -> None:
    gsm8k = (HERE / "train_prompts.jsonl").read_text().splitlines()[:GSM8K_TRAINED]
    general = [json.dumps({"id": f"general-{i}", "prompt": text}) for i, text in enumerate(instructions())]
    write("general_prompts.jsonl", gsm8k + general)
    broad = [json.dumps({"id": f"code-{i}", "prompt": text}) for i, text in enumerate(code_stubs())]
    broad += [json.dumps({"id": f"more-{i}", "prompt": text}) for i, text in enumerate(more_instructions())]
    write("broad_prompts.jsonl", gsm8k[:GSM8K_BROAD] + general + broad)
    print(f"general: {len(general)} instructions + {len(gsm8k)} GSM8K questions; broad adds {len(broad)}")


if __name__ == "__main__":
    main()
