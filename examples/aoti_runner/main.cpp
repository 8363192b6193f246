// aoti_runner: run the decode steps of an AOTInductor package without Python and print ms/token.
//
//   aoti_runner STEP.pt2 INPUTS.pt
//
// STEP.pt2 is written by `entmaxkv-compile export MODULE:FACTORY --format aoti -o STEP.pt2`: the
// rewritten decode step with its state (KV caches, page statistics) inside, updated in place by
// every call. INPUTS.pt is written by entmaxkv_compile.export.aoti.save_runner_inputs (torch.save
// of a dict): "tokens" and "positions", one tensor per step, and optionally "expected", the output
// of each step, which is compared with what the package computes, and "state", caches and page
// statistics (by constant name) to load into the package first: decoding then starts from that
// cache instead of the one the package was exported with. The runner calls the package once per
// step in order (each call continues the sequence) and prints the time of the first call and the
// mean, median and minimum ms/token of the others.
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/serialize.h>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <numeric>
#include <string>
#include <unordered_map>
#include <vector>

namespace {

std::vector<char> read_file(const std::string& path) {
  std::ifstream stream(path, std::ios::binary);
  if (!stream) {
    throw std::runtime_error("cannot open INPUTS file " + path);
  }
  return {std::istreambuf_iterator<char>(stream), std::istreambuf_iterator<char>()};
}

std::vector<torch::Tensor> tensors(const c10::Dict<c10::IValue, c10::IValue>& data, const std::string& key) {
  std::vector<torch::Tensor> out;
  if (!data.contains(key)) {
    return out;
  }
  for (const c10::IValue& value : data.at(key).toListRef()) {
    out.push_back(value.toTensor());
  }
  return out;
}

void synchronize(const c10::Device& device) {
  if (device.is_cuda()) {
    torch::cuda::synchronize(device.index());
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s STEP.pt2 INPUTS.pt\n", argv[0]);
    return 2;
  }
  try {
    c10::InferenceMode inference;
    torch::inductor::AOTIModelPackageLoader loader(argv[1]);
    auto metadata = loader.get_metadata();
    const std::string device_type = metadata.count("AOTI_DEVICE_KEY") ? metadata["AOTI_DEVICE_KEY"] : "cpu";
    const c10::Device device(device_type == "cuda" ? "cuda:0" : "cpu");

    const auto data = torch::pickle_load(read_file(argv[2])).toGenericDict();
    const auto tokens = tensors(data, "tokens");
    const auto positions = tensors(data, "positions");
    const auto expected = tensors(data, "expected");
    if (tokens.empty() || tokens.size() != positions.size() ||
        (!expected.empty() && expected.size() != tokens.size())) {
      throw std::runtime_error("INPUTS must hold non-empty 'tokens' and 'positions' lists of one length "
                               "(and 'expected' of the same length, if present)");
    }

    if (data.contains("state")) {
      std::unordered_map<std::string, at::Tensor> state;
      for (const auto& entry : data.at("state").toGenericDict()) {
        state[entry.key().toStringRef()] = entry.value().toTensor().to(device);
      }
      loader.load_constants(state, /*use_inactive=*/false, /*check_full_update=*/false);
      std::printf("state tensors loaded: %zu\n", state.size());
    }

    std::vector<double> ms;
    double max_error = 0.0;
    for (size_t step = 0; step < tokens.size(); ++step) {
      std::vector<torch::Tensor> inputs = {tokens[step].to(device), positions[step].to(device)};
      synchronize(device);
      const auto start = std::chrono::steady_clock::now();
      std::vector<torch::Tensor> outputs = loader.run(inputs);
      synchronize(device);
      const auto stop = std::chrono::steady_clock::now();
      ms.push_back(std::chrono::duration<double, std::milli>(stop - start).count());
      if (!expected.empty()) {
        const auto difference = (outputs.at(0).to(torch::kCPU).to(torch::kDouble) -
                                 expected[step].to(torch::kDouble)).abs().max();
        max_error = std::max(max_error, difference.item<double>());
      }
    }

    std::printf("package: %s (%s)\n", argv[1], device_type.c_str());
    std::printf("steps: %zu\n", ms.size());
    std::printf("first step: %.3f ms\n", ms.front());
    if (ms.size() > 1) {
      std::vector<double> rest(ms.begin() + 1, ms.end());
      const double mean = std::accumulate(rest.begin(), rest.end(), 0.0) / rest.size();
      std::sort(rest.begin(), rest.end());
      std::printf("ms/token: mean %.3f median %.3f min %.3f (steps 2-%zu)\n", mean, rest[rest.size() / 2],
                  rest.front(), ms.size());
    }
    if (!expected.empty()) {
      std::printf("max abs error vs expected: %.3g\n", max_error);
    }
  } catch (const std::exception& error) {
    std::fprintf(stderr, "aoti_runner: error: %s\n", error.what());
    return 1;
  }
  return 0;
}
