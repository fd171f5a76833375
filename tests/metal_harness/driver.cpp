// Entry point of a harness binary; included at the end of the file harness.py generates, which defines
//   harness_kernel_thread (a harness::ThreadFn calling the kernel body for one thread),
//   harness_buffer_count and harness_is_output[] (one flag per kernel argument, inputs then outputs).
//
// Usage: kernel DIR GX GY GZ TX TY TZ. Argument i is read from DIR/b<i>.bin (outputs arrive pre-poisoned by
// harness.py) and every output is written back to the same file after the whole grid has run.
// (Its standard headers come from metal_compat.h, ahead of the address-space macros.)

static std::vector<char> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    std::fprintf(stderr, "harness: cannot read %s\n", path.c_str());
    std::exit(2);
  }
  return std::vector<char>(std::istreambuf_iterator<char>(in), {});
}

int main(int argc, char** argv) {
  if (argc != 8) {
    std::fprintf(stderr, "usage: %s DIR GX GY GZ TX TY TZ\n", argv[0]);
    return 2;
  }
  const std::string dir = argv[1];
  const uint3 grid{uint(std::atoi(argv[2])), uint(std::atoi(argv[3])), uint(std::atoi(argv[4]))};
  const uint3 tg{uint(std::atoi(argv[5])), uint(std::atoi(argv[6])), uint(std::atoi(argv[7]))};

  // Each buffer is followed by a guard band, checked after the run to catch out-of-bounds writes.
  constexpr size_t kGuard = 256;
  constexpr unsigned char kGuardByte = 0xA5;
  std::vector<std::vector<uint64_t>> storage(harness_buffer_count);
  std::vector<size_t> sizes(harness_buffer_count);
  std::vector<void*> buffers(harness_buffer_count);
  for (int i = 0; i < harness_buffer_count; ++i) {
    const std::vector<char> bytes = read_file(dir + "/b" + std::to_string(i) + ".bin");
    sizes[i] = bytes.size();
    storage[i].assign((bytes.size() + kGuard + 7) / 8, 0);
    char* base = reinterpret_cast<char*>(storage[i].data());
    std::memcpy(base, bytes.data(), bytes.size());
    std::memset(base + bytes.size(), kGuardByte, kGuard);
    buffers[i] = base;
  }

  harness::dispatch_threads(harness_kernel_thread, buffers.data(), grid, tg);

  int status = 0;
  for (int i = 0; i < harness_buffer_count; ++i) {
    const unsigned char* guard = static_cast<unsigned char*>(buffers[i]) + sizes[i];
    for (size_t j = 0; j < kGuard; ++j) {
      if (guard[j] != kGuardByte) {
        std::fprintf(stderr, "harness: write past the end of argument %d\n", i);
        status = 4;
        break;
      }
    }
    if (!harness_is_output[i]) continue;
    std::ofstream out(dir + "/b" + std::to_string(i) + ".bin", std::ios::binary);
    out.write(static_cast<const char*>(buffers[i]), sizes[i]);
  }
  return status;
}
