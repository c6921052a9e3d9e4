// Float32 CPU kernels for the decoder step (x86-64 with AVX-512), as MLX primitives.
//
// - attention_inputs and layer_rest: a decoder layer's step in two operations around its cache
//   write, where MLX runs about 25 (each a task for its stream's thread). attention_inputs: layer
//   norm, then the queries, keys and values. layer_rest: the self-attention over the cache (scores,
//   softmax and weighted sum in one pass per head; a float16 cache is widened in registers), the
//   output projection, the cross-attention to the text, the GELU feed-forward, the residuals.
// - few_row_product(x, w): x (..., k) @ W^T for W (n, k) and 1 to 8 rows of x (the LM heads).
// - layer_norm(x, weight, bias, eps): one operation, where MLX's CPU backend runs five.
// - elu(x): EnCodec's activation, vectorized (MLX's CPU expm1 is scalar) and over both cores.
// - quantized_product(x, w, scales, biases, bits): x @ dequantize(W)^T for MLX's 8- or 4-bit affine
//   quantization in groups of 64 (a quantized decoder's products), 1 to 8 rows of x.
//
// Every weight product reads W once for all its rows (1 to 8: classifier-free guidance's pair for
// one to four prompts), four (three, for more than 4 rows) of W's rows at a time, where OpenBLAS packs W for a few-row product
// (sgemm) or runs its small-matrix path on one thread. Products and attention split their work with a helper thread that spins briefly
// between jobs: two cores on one MLX stream, joined in microseconds (a join between two MLX streams
// costs tens). Compiled on first use by musicgen/cpu_kernels.py.

#include <immintrin.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <functional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <nanobind/nanobind.h>
#include <nanobind/stl/vector.h>

#include "mlx/backend/cpu/encoder.h"
#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace mx = mlx::core;
namespace nb = nanobind;

namespace {

constexpr int LANES = 16;

// The first `count` floats at p (count <= 16), zeros past them.
inline __m512 load_part(const float* p, int count) {
  return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << count) - 1), p);
}

// The same from float16 (a half-precision K/V cache), widened to float32 in registers.
inline __m512 load_part(const mx::float16_t* p, int count) {
  auto mask = static_cast<__mmask16>((1u << count) - 1);
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p));
}

// A second thread that takes one half of a job: it spins ~10 us for the next one, then sleeps.
// One job at a time: a caller that finds it busy (kernels on two MLX streams at once) runs both halves.
class Helper {
 public:
  Helper() : thread_([this] { loop(); }) { thread_.detach(); }

  void run(std::function<void()> theirs, const std::function<void()>& mine) {
    if (busy_.exchange(true, std::memory_order_acquire)) {
      mine();
      theirs();
      return;
    }
    job_ = std::move(theirs);
    int generation = generation_.fetch_add(1, std::memory_order_release) + 1;
    generation_.notify_one();
    mine();
    for (int spins = 0; done_.load(std::memory_order_acquire) != generation; spins++)
      if (spins > FINISH_SPINS) std::this_thread::yield();  // the helper may need this core
      else _mm_pause();
    busy_.store(false, std::memory_order_release);
  }

 private:
  static constexpr int SPINS = 1 << 10, FINISH_SPINS = 1 << 8;

  void loop() {
    int seen = 0;
    for (;;) {
      for (int spins = 0; generation_.load(std::memory_order_acquire) == seen; spins++)
        if (spins > SPINS) generation_.wait(seen, std::memory_order_acquire);
        else _mm_pause();
      seen = generation_.load(std::memory_order_acquire);
      job_();
      done_.store(seen, std::memory_order_release);
    }
  }

  std::atomic<bool> busy_{false};
  std::atomic<int> generation_{0}, done_{0};
  std::function<void()> job_;
  std::thread thread_;
};

Helper& helper() {
  static Helper* shared = new Helper();  // never destroyed: its thread outlives static teardown
  return *shared;
}

// Runs part(0, mid) here and part(mid, units) on the helper, mid a multiple of `align`.
template <class Part>
void in_two(int units, int align, bool worth_it, Part part) {
  int mid = units / 2 / align * align;
  if (!worth_it || mid == 0) return part(0, units);
  helper().run([=] { part(mid, units); }, [=] { part(0, mid); });
}

// The layout of an input: its data is read inside the dispatched task (computed by then).
struct Layout {
  mx::Shape shape;
  mx::Strides strides;
  bool row_contiguous;

  explicit Layout(const mx::array& a)
      : shape(a.shape()), strides(a.strides()), row_contiguous(a.flags().row_contiguous) {}

  // The elements in row-major order: `data` itself, or a copy into `buffer` for a strided view.
  const float* row_major(const float* data, std::vector<float>& buffer) const {
    if (row_contiguous) return data;
    size_t size = 1;
    for (auto n : shape) size *= n;
    buffer.resize(size);
    std::vector<int> index(shape.size(), 0);
    for (size_t i = 0; i < size; i++) {
      int64_t offset = 0;
      for (size_t d = 0; d < shape.size(); d++) offset += index[d] * strides[d];
      buffer[i] = data[offset];
      for (int d = static_cast<int>(shape.size()) - 1; d >= 0 && ++index[d] == shape[d]; d--)
        index[d] = 0;
    }
    return buffer.data();
  }
};

// The inputs of a dispatched task, read in row-major order (copies of strided views).
struct Inputs {
  std::vector<const float*> data;
  std::vector<Layout> layouts;

  explicit Inputs(const std::vector<mx::array>& arrays, size_t count) {
    for (size_t i = 0; i < count; i++) {
      data.push_back(arrays[i].data<float>());
      layouts.emplace_back(arrays[i]);
    }
  }

  // Pointers to the inputs' elements in row-major order; `buffers` holds the copies.
  std::vector<const float*> row_major(std::vector<std::vector<float>>& buffers) const {
    buffers.resize(data.size());
    std::vector<const float*> out;
    for (size_t i = 0; i < data.size(); i++) out.push_back(layouts[i].row_major(data[i], buffers[i]));
    return out;
  }
};

template <size_t N>
std::array<const float*, N> unpack(const std::vector<const float*>& v) {
  std::array<const float*, N> out;
  std::copy_n(v.begin(), N, out.begin());
  return out;
}

void check(bool ok, const char* what) {
  if (!ok) throw std::invalid_argument(what);
}

void encode(mx::cpu::CommandEncoder& encoder, const std::vector<mx::array>& inputs, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  for (const auto& a : inputs) encoder.set_input_array(a);
  encoder.set_output_array(out);
}

// An MLX primitive that runs on the CPU only.
class CpuPrimitive : public mx::UnaryPrimitive {
 public:
  CpuPrimitive(mx::Stream stream, const char* name) : mx::UnaryPrimitive(stream), name_(name) {}

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error(std::string(name_) + " runs on the CPU only");
  }

  const char* name() const override { return name_; }

 private:
  const char* name_;
};

// ------------------------------------------------------------------------------- few_row_product

// acc[r][i] += W[i] . x[r] over the 16 (or, not FULL, `count`) floats at column c of B weight rows
// (w0, w0 + k, ...) and M rows of x: each weight vector is loaded once for every row of x.
template <int M, int B, bool FULL>
inline void weight_rows_at(const float* x, const float* w0, int k, int c, int count,
                           __m512 (&acc)[M][B]) {
  __m512 v[B];
  for (int i = 0; i < B; i++)
    v[i] = FULL ? _mm512_loadu_ps(w0 + i * k + c) : load_part(w0 + i * k + c, count);
  for (int r = 0; r < M; r++) {
    __m512 u = FULL ? _mm512_loadu_ps(x + r * k + c) : load_part(x + r * k + c, count);
    for (int i = 0; i < B; i++) acc[r][i] = _mm512_fmadd_ps(v[i], u, acc[r][i]);
  }
}

// y[r * n + j] = x[r] . W[j] for rows r < M (1 to 8) and weight rows j in [j0, j1): four weight rows
// at a time for up to 4 rows of x, three for more (the M x B accumulators, B weight vectors and one
// of x fit the 32 vector registers: at 8 rows 28). Three against two at 6 / 8 rows: 58-59 against
// 61-64 / 65 against 75-79 ms a musicgen-small step at ~100 positions.
template <int M>
void few_rows(const float* x, const float* w, float* y, int n, int k, int j0, int j1) {
  constexpr int B = M <= 4 ? 4 : 3;
  const int body = k / LANES * LANES, tail = k - body;
  int j = j0;
  for (; j + B <= j1; j += B) {
    const float* w0 = w + static_cast<size_t>(j) * k;
    __m512 acc[M][B];
    for (auto& row : acc)
      for (auto& a : row) a = _mm512_setzero_ps();
    for (int c = 0; c < body; c += LANES) weight_rows_at<M, B, true>(x, w0, k, c, LANES, acc);
    if (tail) weight_rows_at<M, B, false>(x, w0, k, body, tail, acc);
    for (int r = 0; r < M; r++)
      for (int i = 0; i < B; i++) y[r * n + j + i] = _mm512_reduce_add_ps(acc[r][i]);
  }
  for (; j < j1; j++)
    for (int r = 0; r < M; r++) {
      const float* wj = w + static_cast<size_t>(j) * k;
      __m512 a = _mm512_setzero_ps();
      for (int c = 0; c < body; c += LANES)
        a = _mm512_fmadd_ps(_mm512_loadu_ps(wj + c), _mm512_loadu_ps(x + r * k + c), a);
      if (tail) a = _mm512_fmadd_ps(load_part(wj + body, tail), load_part(x + r * k + body, tail), a);
      y[r * n + j] = _mm512_reduce_add_ps(a);
    }
}

// The rows one weight product takes: classifier-free guidance's pair for up to four prompts.
constexpr int MAX_ROWS = 8;

// Runs few_rows<rows> (rows 1 to MAX_ROWS).
inline void few_rows_of(int rows, const float* x, const float* w, float* y, int n, int k, int j0,
                        int j1) {
  switch (rows) {
    case 1: return few_rows<1>(x, w, y, n, k, j0, j1);
    case 2: return few_rows<2>(x, w, y, n, k, j0, j1);
    case 3: return few_rows<3>(x, w, y, n, k, j0, j1);
    case 4: return few_rows<4>(x, w, y, n, k, j0, j1);
    case 5: return few_rows<5>(x, w, y, n, k, j0, j1);
    case 6: return few_rows<6>(x, w, y, n, k, j0, j1);
    case 7: return few_rows<7>(x, w, y, n, k, j0, j1);
    default: return few_rows<8>(x, w, y, n, k, j0, j1);
  }
}

// y (rows, n) = x (rows, k) @ W^T for 1 to MAX_ROWS rows, W's rows split with the helper.
void product(const float* x, int rows, const float* w, float* y, int n, int k) {
  in_two(n, 4, static_cast<long>(n) * k >= (1 << 16),
         [=](int j0, int j1) { few_rows_of(rows, x, w, y, n, k, j0, j1); });
}

class FewRowProduct : public CpuPrimitive {
 public:
  explicit FewRowProduct(mx::Stream stream) : CpuPrimitive(stream, "FewRowProduct") {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    auto& encoder = mx::cpu::get_command_encoder(stream());
    encode(encoder, inputs, out);
    int k = inputs[0].shape(-1), rows = inputs[0].size() / k, n = inputs[1].shape(0);
    encoder.dispatch([in = Inputs(inputs, 2), y = out.data<float>(), rows, n, k] {
      std::vector<std::vector<float>> buffers;  // copies of strided views (a weight never is one)
      auto [x, w] = unpack<2>(in.row_major(buffers));
      product(x, rows, w, y, n, k);
    });
  }

  bool is_equivalent(const mx::Primitive&) const override { return true; }
};

mx::array few_row_product(const mx::array& x, const mx::array& w) {
  if (x.dtype() != mx::float32 || w.dtype() != mx::float32 || w.ndim() != 2 || x.ndim() < 1 ||
      x.shape(-1) != w.shape(1))
    throw std::invalid_argument("few_row_product: float32 x (..., k) and W (n, k)");
  if (x.size() / x.shape(-1) > MAX_ROWS)
    throw std::invalid_argument("few_row_product: at most 8 rows");
  auto stream = mx::default_stream(mx::Device::cpu);
  auto shape = x.shape();
  shape.back() = w.shape(0);
  return mx::array(shape, mx::float32, std::make_shared<FewRowProduct>(stream), {x, w});
}

// --------------------------------------------------------------------------- quantized_product

// MLX's affine quantization with groups of 64: W[j][c] = scale[j][g] * q[j][c] + bias[j][g] for the
// group g = c / 64, q packed in little-endian order (8 bits: one byte each; 4 bits: low nibble first).
constexpr int GROUP = 64;

// 16 quantized weights from element c of a packed row, as floats.
template <int BITS>
inline __m512 load_quantized(const uint8_t* row, int c) {
  if constexpr (BITS == 8) {
    auto bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + c));
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes));
  } else {
    auto bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + c / 2));
    auto low = _mm_and_si128(bytes, _mm_set1_epi8(15));
    auto high = _mm_and_si128(_mm_srli_epi16(bytes, 4), _mm_set1_epi8(15));
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(low, high)));
  }
}

// y[r * n + j] = x[r] . W[j] for rows r < M and weight rows j in [j0, j1), B weight rows at a time:
// per group, the dot of x with q (accumulated in `part`) is scaled into `acc`; the biases' share is
// bias . (the sums of x over each group), `sums` (M, groups).
template <int M, int B, int BITS>
void quantized_rows(const float* x, const float* sums, const uint8_t* q, const float* scales,
                    const float* biases, float* y, int n, int k, int j0, int j1) {
  const int groups = k / GROUP;
  const size_t row_bytes = static_cast<size_t>(k) * BITS / 8;
  for (int j = j0; j < j1; j += B) {
    const int count = std::min(B, j1 - j);
    __m512 acc[M][B];
    for (auto& row : acc)
      for (auto& a : row) a = _mm512_setzero_ps();
    for (int g = 0; g < groups; g++) {
      __m512 part[M][B];
      for (auto& row : part)
        for (auto& a : row) a = _mm512_setzero_ps();
      for (int c = g * GROUP; c < (g + 1) * GROUP; c += LANES) {
        __m512 v[B];
        for (int i = 0; i < B; i++)
          v[i] = i < count ? load_quantized<BITS>(q + (j + i) * row_bytes, c) : _mm512_setzero_ps();
        for (int r = 0; r < M; r++) {
          __m512 u = _mm512_loadu_ps(x + r * k + c);
          for (int i = 0; i < B; i++) part[r][i] = _mm512_fmadd_ps(v[i], u, part[r][i]);
        }
      }
      for (int i = 0; i < count; i++) {
        __m512 scale = _mm512_set1_ps(scales[static_cast<size_t>(j + i) * groups + g]);
        for (int r = 0; r < M; r++) acc[r][i] = _mm512_fmadd_ps(scale, part[r][i], acc[r][i]);
      }
    }
    for (int i = 0; i < count; i++)
      for (int r = 0; r < M; r++) {
        const float* bias = biases + static_cast<size_t>(j + i) * groups;
        float shift = 0;
        for (int g = 0; g < groups; g++) shift += bias[g] * sums[r * groups + g];
        y[r * n + j + i] = _mm512_reduce_add_ps(acc[r][i]) + shift;
      }
  }
}

// quantized_rows<rows, B, BITS> for 1 to MAX_ROWS rows: B weight rows at a time such that the
// accumulators (2 M B vectors) and the B weight vectors fit the 32 vector registers.
template <int BITS>
void quantized_rows_of(int rows, const float* x, const float* sums, const uint8_t* q,
                       const float* scales, const float* biases, float* y, int n, int k, int j0,
                       int j1) {
  switch (rows) {
    case 1: return quantized_rows<1, 4, BITS>(x, sums, q, scales, biases, y, n, k, j0, j1);
    case 2: return quantized_rows<2, 4, BITS>(x, sums, q, scales, biases, y, n, k, j0, j1);
    case 3: return quantized_rows<3, 3, BITS>(x, sums, q, scales, biases, y, n, k, j0, j1);
    case 4: return quantized_rows<4, 2, BITS>(x, sums, q, scales, biases, y, n, k, j0, j1);
    case 5: return quantized_rows<5, 2, BITS>(x, sums, q, scales, biases, y, n, k, j0, j1);
    case 6: return quantized_rows<6, 2, BITS>(x, sums, q, scales, biases, y, n, k, j0, j1);
    case 7: return quantized_rows<7, 1, BITS>(x, sums, q, scales, biases, y, n, k, j0, j1);
    default: return quantized_rows<8, 1, BITS>(x, sums, q, scales, biases, y, n, k, j0, j1);
  }
}

// The sums of each row of x (rows, k) over each group of 64: the biases' share of a product.
std::vector<float> group_sums(const float* x, int rows, int k) {
  const int groups = k / GROUP;
  std::vector<float> sums(static_cast<size_t>(rows) * groups);
  for (int r = 0; r < rows; r++)
    for (int g = 0; g < groups; g++) {
      float total = 0;
      for (int c = 0; c < GROUP; c++) total += x[r * k + g * GROUP + c];
      sums[r * groups + g] = total;
    }
  return sums;
}

// A product's weight: float32 W (n, k), or MLX's quantized form (packed q, scales, biases; bits).
struct Weight {
  const float* w = nullptr;
  const uint8_t* q = nullptr;
  const float* scales = nullptr;
  const float* biases = nullptr;
  int bits = 0;

  Weight(const float* w) : w(w) {}  // NOLINT: a float32 weight where one is expected
  Weight(const float* q, const float* scales, const float* biases, int bits)
      : q(reinterpret_cast<const uint8_t*>(q)), scales(scales), biases(biases), bits(bits) {}

  // y rows for weight rows [j0, j1) of the product with x (rows, k); `sums`: group_sums(x).
  void rows_of(int rows, const float* x, const float* sums, float* y, int n, int k, int j0,
               int j1) const {
    if (!bits) return few_rows_of(rows, x, w, y, n, k, j0, j1);
    if (bits == 8) return quantized_rows_of<8>(rows, x, sums, q, scales, biases, y, n, k, j0, j1);
    quantized_rows_of<4>(rows, x, sums, q, scales, biases, y, n, k, j0, j1);
  }
};

// y (rows, n) = x (rows, k) @ W^T for 1 to MAX_ROWS rows, W's rows split with the helper.
void product(const float* x, int rows, const Weight& w, float* y, int n, int k) {
  if (!w.bits) return product(x, rows, w.w, y, n, k);
  auto sums = group_sums(x, rows, k);
  in_two(n, 4, static_cast<long>(n) * k >= (1 << 16),
         [&](int j0, int j1) { w.rows_of(rows, x, sums.data(), y, n, k, j0, j1); });
}

class QuantizedProduct : public CpuPrimitive {
 public:
  QuantizedProduct(mx::Stream stream, int bits)
      : CpuPrimitive(stream, "QuantizedProduct"), bits_(bits) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    auto& encoder = mx::cpu::get_command_encoder(stream());
    encode(encoder, inputs, out);
    int k = inputs[0].shape(-1), rows = inputs[0].size() / k, n = inputs[1].shape(0);
    const auto* q = reinterpret_cast<const uint8_t*>(inputs[1].data<uint32_t>());
    std::vector<mx::array> floats{inputs[0], inputs[2], inputs[3]};
    encoder.dispatch([in = Inputs(floats, 3), q, y = out.data<float>(), rows, n, k,
                      bits = bits_] {
      std::vector<std::vector<float>> buffers;
      auto [x, scales, biases] = unpack<3>(in.row_major(buffers));
      product(x, rows, Weight(reinterpret_cast<const float*>(q), scales, biases, bits), y, n, k);
    });
  }

  bool is_equivalent(const mx::Primitive& other) const override {
    return bits_ == static_cast<const QuantizedProduct&>(other).bits_;
  }

 private:
  int bits_;
};

mx::array quantized_product(const mx::array& x, const mx::array& w, const mx::array& scales,
                            const mx::array& biases, int bits) {
  const char* usage =
      "quantized_product: float32 x (..., k) with 1 to 8 rows, W uint32 (n, k * bits / 32) of 8- or "
      "4-bit values quantized in groups of 64 (k a multiple of 64), float32 scales and biases (n, "
      "k / 64)";
  int k = x.ndim() >= 1 ? x.shape(-1) : 0;
  int n = w.ndim() == 2 ? w.shape(0) : 0;
  bool shapes = (bits == 8 || bits == 4) && k > 0 && k % GROUP == 0 && n > 0 &&
                w.shape(1) == k * bits / 32 && scales.shape() == mx::Shape{n, k / GROUP} &&
                biases.shape() == scales.shape();
  check(x.dtype() == mx::float32 && w.dtype() == mx::uint32 && scales.dtype() == mx::float32 &&
            biases.dtype() == mx::float32 && shapes && x.size() / k <= MAX_ROWS &&
            w.flags().row_contiguous,
        usage);
  auto shape = x.shape();
  shape.back() = n;
  auto stream = mx::default_stream(mx::Device::cpu);
  return mx::array(shape, mx::float32, std::make_shared<QuantizedProduct>(stream, bits),
                   {x, w, scales, biases});
}

// ------------------------------------------------------------------------------------ attention

// exp(x) for x <= 0: 2^n 2^f with n = round(x log2 e), |f| <= 1/2 (relative error ~2e-7).
inline __m512 exp_nonpositive(__m512 x) {
  __m512 t = _mm512_max_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                           _mm512_set1_ps(-126.f));
  __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.535336188319500e-4f);
  for (float c : {1.339887440266574e-3f, 9.618437357674640e-3f, 5.550332471162809e-2f,
                  2.402264791363012e-1f, 6.931472028550421e-1f, 1.f})
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}

constexpr int MAX_HEAD_DIM = 256;

// Asks for the cache lines of `bytes` bytes at p ahead of their use. A head's keys and values are
// short streams (25 KB each at 100 positions), too short for the hardware prefetcher to find in
// time: asking for them AHEAD positions early made the step 1.7 / 3.2 / 3.7 ms faster at ~100 /
// ~750 / ~1450 positions (docs/benchmarks.md).
inline void prefetch(const void* p, size_t bytes) {
  for (size_t i = 0; i < bytes; i += 64) _mm_prefetch(static_cast<const char*>(p) + i, _MM_HINT_T0);
}

constexpr int AHEAD = 8;

// One head: out = softmax(q K^T) V over `length` positions of d floats, `stride` apart; positions
// whose `keep` entry is 0 (if given) get no weight. s: scratch for length + 16 floats.
template <class T>
void attend_head(const float* q, const T* keys, const T* values, float* out, int length, int d,
                 size_t stride, const float* keep, float* s) {
  const int blocks = (d + LANES - 1) / LANES, tail = d - (blocks - 1) * LANES;
  __m512 query[MAX_HEAD_DIM / LANES];
  for (int c = 0; c < blocks; c++) query[c] = load_part(q + c * LANES, c + 1 < blocks ? LANES : tail);
  float top = -INFINITY;
  const size_t row = d * sizeof(T);
  for (int l = 0; l < std::min(length, AHEAD); l++) prefetch(keys + l * stride, row);
  for (int l = 0; l < length; l++) {
    const T* key = keys + l * stride;
    if (l + AHEAD < length) prefetch(key + AHEAD * stride, row);
    if (l < AHEAD) prefetch(values + l * stride, row);
    __m512 a = _mm512_setzero_ps();
    for (int c = 0; c < blocks; c++)
      a = _mm512_fmadd_ps(query[c], load_part(key + c * LANES, c + 1 < blocks ? LANES : tail), a);
    s[l] = keep && !keep[l] ? -INFINITY : _mm512_reduce_add_ps(a);
    top = std::max(top, s[l]);
  }
  __m512 total = _mm512_setzero_ps(), shift = _mm512_set1_ps(top);
  for (int l = 0; l < length; l += LANES) {
    auto part = static_cast<__mmask16>(length - l >= LANES ? 0xffff : (1u << (length - l)) - 1);
    __m512 score = _mm512_maskz_loadu_ps(part, s + l);
    auto kept = _mm512_mask_cmp_ps_mask(part, score, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ);
    __m512 e = _mm512_maskz_mov_ps(kept, exp_nonpositive(_mm512_sub_ps(score, shift)));
    _mm512_mask_storeu_ps(s + l, part, e);
    total = _mm512_add_ps(total, e);
  }
  __m512 acc[MAX_HEAD_DIM / LANES];
  for (int c = 0; c < blocks; c++) acc[c] = _mm512_setzero_ps();
  for (int l = 0; l < length; l++) {
    __m512 weight = _mm512_set1_ps(s[l]);
    const T* value = values + l * stride;
    if (l + AHEAD < length) prefetch(value + AHEAD * stride, row);
    for (int c = 0; c < blocks; c++)
      acc[c] = _mm512_fmadd_ps(weight, load_part(value + c * LANES, c + 1 < blocks ? LANES : tail), acc[c]);
  }
  float sum = _mm512_reduce_add_ps(total);
  __m512 scale = _mm512_set1_ps(sum > 0 ? 1.f / sum : 0.f);  // all masked: zeros
  for (int c = 0; c < blocks; c++) {
    auto mask = static_cast<__mmask16>(c + 1 < blocks ? 0xffff : (1u << tail) - 1);
    _mm512_mask_storeu_ps(out + c * LANES, mask, _mm512_mul_ps(acc[c], scale));
  }
}

// ------------------------------------------------------------------------------------ layer_norm

// y = (x - mean) / sqrt(var + eps) * w + b for each of `rows` rows of d floats.
void norm_rows(const float* x, const float* w, const float* b, float* y, int rows, int d, float eps) {
  for (int r = 0; r < rows; r++) {
    const float* row = x + static_cast<size_t>(r) * d;
    float* o = y + static_cast<size_t>(r) * d;
    float sum = 0, squares = 0;
    for (int c = 0; c < d; c++) sum += row[c];
    const float mean = sum / d;
    for (int c = 0; c < d; c++) squares += (row[c] - mean) * (row[c] - mean);
    const float scale = 1.f / std::sqrt(squares / d + eps);
    for (int c = 0; c < d; c++) o[c] = (row[c] - mean) * scale * w[c] + b[c];
  }
}

// (x - mean) / sqrt(var + eps) * weight + bias over the last axis, one row at a time (MLX's CPU
// backend runs mx.fast.layer_norm as five operations).
class LayerNorm : public CpuPrimitive {
 public:
  LayerNorm(mx::Stream stream, float eps) : CpuPrimitive(stream, "LayerNorm"), eps_(eps) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    auto& encoder = mx::cpu::get_command_encoder(stream());
    encode(encoder, inputs, out);
    int d = inputs[0].shape(-1), rows = inputs[0].size() / d;
    encoder.dispatch([in = Inputs(inputs, 3), y = out.data<float>(), rows, d, eps = eps_] {
      std::vector<std::vector<float>> buffers;
      auto [x, w, b] = unpack<3>(in.row_major(buffers));
      norm_rows(x, w, b, y, rows, d, eps);
    });
  }

  bool is_equivalent(const mx::Primitive& other) const override {
    return eps_ == static_cast<const LayerNorm&>(other).eps_;
  }

 private:
  float eps_;
};

mx::array layer_norm(const mx::array& x, const mx::array& weight, const mx::array& bias, float eps) {
  if (x.dtype() != mx::float32 || weight.dtype() != mx::float32 || bias.dtype() != mx::float32 ||
      x.ndim() < 1 || weight.shape() != mx::Shape{x.shape(-1)} || bias.shape() != weight.shape())
    throw std::invalid_argument("layer_norm: float32 x (..., d), weight (d,) and bias (d,)");
  auto stream = mx::default_stream(mx::Device::cpu);
  return mx::array(x.shape(), mx::float32, std::make_shared<LayerNorm>(stream, eps),
                   {x, weight, bias});
}


// --------------------------------------------------------------------------------- decoder layer
// A decoder layer's step in two operations around the cache write (MLX's in-place slice update):
// attention_inputs (layer norm; q, k, v) and layer_rest (self-attention over the cache, output
// projection, cross-attention, feed-forward). Where MLX runs about 25 operations, each one a task
// for its stream's thread, this is two; the helper thread stays warm between their products.

// x * (1 + erf(x / sqrt 2)) / 2 (the exact GELU) with Eigen's rational erf, as the decoder's
// MLX `gelu` computes it, in place over n floats.
void gelu(float* x, int n) {
  for (int i = 0; i < n; i += LANES) {
    auto part = static_cast<__mmask16>(n - i >= LANES ? 0xffff : (1u << (n - i)) - 1);
    __m512 v = _mm512_maskz_loadu_ps(part, x + i);
    __m512 y = _mm512_mul_ps(v, _mm512_set1_ps(0.7071067811865476f));
    y = _mm512_min_ps(_mm512_max_ps(y, _mm512_set1_ps(-4.f)), _mm512_set1_ps(4.f));
    __m512 y2 = _mm512_mul_ps(y, y);
    __m512 p = _mm512_set1_ps(-2.72614225801306e-10f), q = _mm512_set1_ps(-1.45660718464996e-05f);
    for (float c : {2.77068142495902e-08f, -2.10102402082508e-06f, -5.69250639462346e-05f,
                    -7.34990630326855e-04f, -2.95459980854025e-03f, -1.60960333262415e-02f})
      p = _mm512_fmadd_ps(p, y2, _mm512_set1_ps(c));
    for (float c : {-2.13374055278905e-04f, -1.68282697438203e-03f, -7.37332916720468e-03f,
                    -1.42647390514189e-02f})
      q = _mm512_fmadd_ps(q, y2, _mm512_set1_ps(c));
    __m512 erf = _mm512_div_ps(_mm512_mul_ps(y, p), q);
    __m512 out = _mm512_mul_ps(_mm512_mul_ps(v, _mm512_add_ps(erf, _mm512_set1_ps(1.f))),
                               _mm512_set1_ps(0.5f));
    _mm512_mask_storeu_ps(x + i, part, out);
  }
}

void add_to(float* x, const float* y, size_t n) {
  for (size_t i = 0; i < n; i++) x[i] += y[i];
}

// (3, rows, d): the scaled queries, the keys and the values of layer_norm(x) (no biases).
class AttentionInputs : public CpuPrimitive {
 public:
  // bits 8 or 4: the projections are quantized, their scales and biases the last 6 inputs.
  AttentionInputs(mx::Stream stream, float scale, float eps, int bits)
      : CpuPrimitive(stream, "AttentionInputs"), scale_(scale), eps_(eps), bits_(bits) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    auto& encoder = mx::cpu::get_command_encoder(stream());
    encode(encoder, inputs, out);
    int d = inputs[0].shape(-1), rows = inputs[0].size() / d;
    encoder.dispatch([in = Inputs(inputs, inputs.size()), y = out.data<float>(), rows, d,
                      scale = scale_, eps = eps_, bits = bits_] {
      std::vector<std::vector<float>> buffers;
      auto p = in.row_major(buffers);
      auto weight = [&](int i) {
        return bits ? Weight(p[3 + i], p[6 + 2 * i], p[7 + 2 * i], bits) : Weight(p[3 + i]);
      };
      const Weight weights[] = {weight(0), weight(1), weight(2)};
      std::vector<float> h(static_cast<size_t>(rows) * d);
      norm_rows(p[0], p[1], p[2], h.data(), rows, d, eps);
      const auto sums = bits ? group_sums(h.data(), rows, d) : std::vector<float>();
      const size_t size = static_cast<size_t>(rows) * d;
      in_two(d, 4, true, [&, x = h.data()](int j0, int j1) {  // the three products in one job
        for (int i = 0; i < 3; i++)
          weights[i].rows_of(rows, x, sums.data(), y + i * size, d, d, j0, j1);
      });
      for (size_t i = 0; i < size; i++) y[i] *= scale;
    });
  }

 private:
  float scale_, eps_;
  int bits_;
};

// softmax over the n scores at s whose `keep` entry is nonzero (the others get 0).
void masked_softmax(float* s, const float* keep, int n) {
  float top = -INFINITY, sum = 0;
  for (int i = 0; i < n; i++)
    if (keep[i]) top = std::max(top, s[i]);
  for (int i = 0; i < n; i++) sum += s[i] = keep[i] ? std::exp(s[i] - top) : 0.f;
  for (int i = 0; i < n; i++) s[i] = sum > 0 ? s[i] / sum : 0.f;
}

// Where a strided (batch, heads, positions, d) array's heads lie.
struct Heads {
  const void* data;
  int64_t batch, head, position;

  Heads(const mx::array& a)
      : data(a.data<void>()), batch(a.strides()[0]), head(a.strides()[1]), position(a.strides()[2]) {}

  template <class T>
  const T* at(int b, int h) const {
    return static_cast<const T*>(data) + b * batch + h * head;
  }
};

// The cross-attention's forms (TokenStep in musicgen/model.py): none (no row has text), the query
// and output projections folded into the text's keys/values, or those projections as they are.
enum CrossForm { NO_TEXT = 0, FOLDED = 3, PROJECTED = 5 };

// The rest of a decoder layer's step for x (rows, d) given attention_inputs' (3, rows, d) and the
// self-attention cache up to this position (with it): x + attention's projection, + cross-attention
// (first text_rows rows), + feed-forward (GELU, no biases).
class LayerRest : public CpuPrimitive {
 public:
  // bits 8 or 4: out_proj, fc1 and fc2 are quantized, their scales and biases the last 6 inputs.
  LayerRest(mx::Stream stream, int heads, int text_rows, CrossForm form, float scale, float eps,
            int bits)
      : CpuPrimitive(stream, "LayerRest"),
        heads_(heads), text_rows_(text_rows), form_(form), scale_(scale), eps_(eps), bits_(bits) {}

  // The inputs: x, qkv, out_proj, the two layer norms (weight, bias), fc1, fc2, the cross-attention's
  // float inputs (to_scores, from_weights, mask; or q_proj, out_proj, mask), then the strided
  // ones: the cache's keys and values and (PROJECTED) the text's; quantized, then the scales and
  // biases of out_proj, fc1 and fc2.
  static constexpr size_t FLOATS = 9;

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    for (size_t i = floats(); i < floats() + (form_ == PROJECTED ? 4 : 2); i++)
      if (inputs[i].strides()[3] != 1)
        throw std::runtime_error("layer_rest: each position's keys and values must be contiguous");
    auto& encoder = mx::cpu::get_command_encoder(stream());
    encode(encoder, inputs, out);
    if (inputs[floats()].dtype() == mx::float16) run<mx::float16_t>(encoder, inputs, out);
    else run<float>(encoder, inputs, out);
  }

 private:
  size_t floats() const { return FLOATS + (form_ == NO_TEXT ? 0 : 3); }

  template <class T>
  void run(mx::cpu::CommandEncoder& encoder, const std::vector<mx::array>& inputs, mx::array& out) {
    const auto& keys = inputs[floats()];
    int d = inputs[0].shape(-1), rows = inputs[0].size() / d, ffn = inputs[7].shape(0);
    int length = keys.shape(2), head_dim = d / heads_;
    int text_length = form_ == PROJECTED ? inputs[floats() + 2].shape(2)
                      : form_ == FOLDED  ? inputs[FLOATS].shape(1) / heads_
                                         : 0;
    Heads text_keys = form_ == PROJECTED ? Heads(inputs[floats() + 2]) : Heads(keys);
    Heads text_values = form_ == PROJECTED ? Heads(inputs[floats() + 3]) : Heads(keys);
    const std::vector<mx::array> quantization(inputs.end() - (bits_ ? 6 : 0), inputs.end());
    encoder.dispatch([in = Inputs(inputs, floats()), quant = Inputs(quantization, quantization.size()),
                      keys = Heads(keys), values = Heads(inputs[floats() + 1]), text_keys,
                      text_values, y = out.data<float>(), rows, d, ffn, length, head_dim,
                      text_length, heads = heads_, text_rows = text_rows_, form = form_,
                      scale = scale_, eps = eps_, bits = bits_] {
      std::vector<std::vector<float>> buffers, quant_buffers;
      auto p = in.row_major(buffers);
      auto [x, qkv, out_w, cross_w, cross_b, ffn_w, ffn_b, fc1_w, fc2_w] = unpack<FLOATS>(p);
      auto qs = quant.row_major(quant_buffers);
      auto weight = [&](const float* w, int i) {
        return bits ? Weight(w, qs[2 * i], qs[2 * i + 1], bits) : Weight(w);
      };
      const Weight out_proj = weight(out_w, 0), fc1 = weight(fc1_w, 1), fc2 = weight(fc2_w, 2);
      const size_t size = static_cast<size_t>(rows) * d;
      std::vector<float> attended(size), h(size), part(size), wide(static_cast<size_t>(rows) * ffn);
      // self-attention: one pass per (row, head) over the cache, split even when short (the
      // helper then stays awake for the products that follow)
      in_two(rows * heads, 1, true, [&](int u0, int u1) {
        std::vector<float> scores(length + LANES);
        for (int u = u0; u < u1; u++) {
          if (u + 1 < u1) {  // the next head's first positions (contiguous in the cache)
            const size_t bytes = std::min(length, 2 * AHEAD) * head_dim * sizeof(T);
            prefetch(keys.at<T>((u + 1) / heads, (u + 1) % heads), bytes);
            prefetch(values.at<T>((u + 1) / heads, (u + 1) % heads), bytes);
          }
          attend_head(qkv + static_cast<size_t>(u) * head_dim, keys.at<T>(u / heads, u % heads),
                      values.at<T>(u / heads, u % heads), attended.data() + u * head_dim, length,
                      head_dim, keys.position, nullptr, scores.data());
        }
      });
      std::copy(x, x + size, y);
      product(attended.data(), rows, out_proj, part.data(), d, d);
      add_to(y, part.data(), size);
      if (form != NO_TEXT) {
        norm_rows(y, cross_w, cross_b, h.data(), text_rows, d, eps);
        cross_attention(p.data() + FLOATS, form, h.data(), part.data(), text_keys, text_values,
                        text_rows, heads, d, text_length, scale);
        add_to(y, part.data(), static_cast<size_t>(text_rows) * d);
      }
      norm_rows(y, ffn_w, ffn_b, h.data(), rows, d, eps);
      product(h.data(), rows, fc1, wide.data(), ffn, d);
      gelu(wide.data(), rows * ffn);
      product(wide.data(), rows, fc2, part.data(), d, ffn);
      add_to(y, part.data(), size);
    });
  }

  // out (text_rows, d): the cross-attention of the normed rows h over the text.
  static void cross_attention(const float* const* p, CrossForm form, const float* h, float* out,
                              const Heads& keys, const Heads& values, int text_rows, int heads,
                              int d, int length, float scale) {
    const float* keep = p[2];
    std::vector<float> scores(static_cast<size_t>(heads) * length + LANES);
    if (form == FOLDED) {  // per row: scores = to_scores h, out = from_weights softmax(scores)
      const size_t width = static_cast<size_t>(heads) * length;
      for (int t = 0; t < text_rows; t++) {
        product(h + t * d, 1, p[0] + t * width * d, scores.data(), width, d);
        for (int head = 0; head < heads; head++)
          masked_softmax(scores.data() + head * length, keep + t * length, length);
        product(scores.data(), 1, p[1] + t * width * d, out + t * d, d, width);
      }
      return;
    }
    const int head_dim = d / heads;
    std::vector<float> q(static_cast<size_t>(text_rows) * d), attended(q.size());
    product(h, text_rows, p[0], q.data(), d, d);
    for (auto& v : q) v *= scale;
    for (int u = 0; u < text_rows * heads; u++)
      attend_head(q.data() + u * head_dim, keys.at<float>(u / heads, u % heads),
                  values.at<float>(u / heads, u % heads), attended.data() + u * head_dim, length,
                  head_dim, keys.position, keep + (u / heads) * length, scores.data());
    product(attended.data(), text_rows, p[1], out, d, d);
  }

  int heads_, text_rows_;
  CrossForm form_;
  float scale_, eps_;
  int bits_;
};

bool is_vector(const mx::array& a, int n) { return a.dtype() == mx::float32 && a.shape() == mx::Shape{n}; }

bool is_matrix(const mx::array& a, int n, int k) {
  return a.dtype() == mx::float32 && a.shape() == mx::Shape{n, k};
}

// A weight (n, k): float32 (bits 0), or quantized to `bits` in groups of 64 with its scales and
// biases at quantization[2 i] and [2 i + 1].
bool is_weight(const mx::array& a, int n, int k, int bits, const std::vector<mx::array>& quantization,
               size_t i) {
  if (!bits) return is_matrix(a, n, k);
  if (k % GROUP || a.dtype() != mx::uint32 || a.shape() != mx::Shape{n, k * bits / 32} ||
      !a.flags().row_contiguous || quantization.size() < 2 * i + 2)
    return false;
  return is_matrix(quantization[2 * i], n, k / GROUP) && is_matrix(quantization[2 * i + 1], n, k / GROUP);
}

// The `quantization` list goes with `bits`: none for float32 weights, 6 arrays for 8 or 4 bits.
bool fits_bits(int bits, const std::vector<mx::array>& quantization) {
  return bits == 0 ? quantization.empty() : (bits == 8 || bits == 4) && quantization.size() == 6;
}

mx::array attention_inputs(const mx::array& x, const mx::array& norm_weight,
                           const mx::array& norm_bias, const mx::array& q_proj,
                           const mx::array& k_proj, const mx::array& v_proj, float scale, float eps,
                           const std::vector<mx::array>& quantization, int bits) {
  int d = x.ndim() == 2 ? x.shape(1) : 0;
  check(x.dtype() == mx::float32 && d > 0 && x.shape(0) <= MAX_ROWS && is_vector(norm_weight, d) &&
            is_vector(norm_bias, d) && fits_bits(bits, quantization) &&
            is_weight(q_proj, d, d, bits, quantization, 0) &&
            is_weight(k_proj, d, d, bits, quantization, 1) &&
            is_weight(v_proj, d, d, bits, quantization, 2),
        "attention_inputs: float32 x (rows <= 8, d), layer norm (d,) x 2, projections (d, d) x 3 "
        "(float32, or 8- or 4-bit with their float32 scales and biases in `quantization`)");
  std::vector<mx::array> inputs{x, norm_weight, norm_bias, q_proj, k_proj, v_proj};
  inputs.insert(inputs.end(), quantization.begin(), quantization.end());
  auto stream = mx::default_stream(mx::Device::cpu);
  return mx::array({3, x.shape(0), d}, mx::float32,
                   std::make_shared<AttentionInputs>(stream, scale, eps, bits), inputs);
}

mx::array layer_rest(const mx::array& x, const mx::array& qkv, const mx::array& keys,
                     const mx::array& values, const std::vector<mx::array>& weights,
                     const std::vector<mx::array>& cross, int heads, int text_rows, float scale,
                     float eps, const std::vector<mx::array>& quantization, int bits) {
  const char* usage =
      "layer_rest: float32 x (rows <= 8, d), qkv (3, rows, d), float32 or float16 keys/values "
      "(rows, heads, length, d / heads), weights [out_proj, cross norm weight, bias, final norm "
      "weight, bias, fc1, fc2] and cross [] or [to_scores, from_weights, keep] or [q_proj, out_proj, "
      "keep, text keys, text values]; with bits 8 or 4, out_proj, fc1 and fc2 quantized (groups of "
      "64) with their [scales, biases] x 3 in `quantization`, and no projected cross-attention";
  check(x.ndim() == 2 && weights.size() == 7 && heads > 0 && fits_bits(bits, quantization), usage);
  int rows = x.shape(0), d = x.shape(1), ffn = weights[5].ndim() == 2 ? weights[5].shape(0) : 0;
  bool kv_dtype = keys.dtype() == values.dtype() &&
                  (keys.dtype() == mx::float32 || keys.dtype() == mx::float16);
  check(x.dtype() == mx::float32 && rows <= MAX_ROWS && d % heads == 0 && qkv.dtype() == mx::float32 &&
            qkv.shape() == mx::Shape{3, rows, d} && kv_dtype && keys.ndim() == 4 &&
            keys.shape() == values.shape() && keys.shape() == mx::Shape{rows, heads, keys.shape(2), d / heads} &&
            keys.shape(2) > 0 && d / heads <= MAX_HEAD_DIM &&
            is_weight(weights[0], d, d, bits, quantization, 0) && is_vector(weights[1], d) &&
            is_vector(weights[2], d) && is_vector(weights[3], d) && is_vector(weights[4], d) &&
            is_weight(weights[5], ffn, d, bits, quantization, 1) &&
            is_weight(weights[6], d, ffn, bits, quantization, 2),
        usage);
  auto form = static_cast<CrossForm>(cross.size());
  check(!bits || form != PROJECTED, usage);
  check(form == NO_TEXT ? text_rows == 0 : (text_rows > 0 && text_rows <= rows), usage);
  std::vector<mx::array> inputs{x, qkv};
  inputs.insert(inputs.end(), weights.begin(), weights.end());
  if (form == FOLDED) {
    const auto &to_scores = cross[0], &from_weights = cross[1], &keep = cross[2];
    int width = to_scores.ndim() == 3 ? to_scores.shape(1) : 0;
    check(width % heads == 0 && to_scores.dtype() == mx::float32 &&
              to_scores.shape() == mx::Shape{text_rows, width, d} &&
              from_weights.dtype() == mx::float32 &&
              from_weights.shape() == mx::Shape{text_rows, d, width} &&
              keep.dtype() == mx::float32 && keep.shape() == mx::Shape{text_rows, width / heads},
          usage);
    inputs.insert(inputs.end(), cross.begin(), cross.end());
    inputs.insert(inputs.end(), {keys, values});
  } else if (form == PROJECTED) {
    const auto &text_keys = cross[3], &text_values = cross[4], &keep = cross[2];
    int length = text_keys.ndim() == 4 ? text_keys.shape(2) : 0;
    check(is_matrix(cross[0], d, d) && is_matrix(cross[1], d, d) && keep.dtype() == mx::float32 &&
              keep.shape() == mx::Shape{text_rows, length} && text_keys.dtype() == mx::float32 &&
              text_keys.shape() == mx::Shape{text_rows, heads, length, d / heads} &&
              text_values.dtype() == mx::float32 && text_values.shape() == text_keys.shape() &&
              length > 0,
          usage);
    inputs.insert(inputs.end(), cross.begin(), cross.begin() + 3);
    inputs.insert(inputs.end(), {keys, values, text_keys, text_values});
  } else {
    check(form == NO_TEXT, usage);
    inputs.insert(inputs.end(), {keys, values});
  }
  auto stream = mx::default_stream(mx::Device::cpu);
  inputs.insert(inputs.end(), quantization.begin(), quantization.end());
  return mx::array(x.shape(), mx::float32,
                   std::make_shared<LayerRest>(stream, heads, text_rows, form, scale, eps, bits),
                   inputs);
}

// ------------------------------------------------------------------------------------------- elu

// expm1(v) for v <= 0, 16 lanes: v = k ln2 + r with |r| <= ln2 / 2, expm1(v) = 2^k expm1(r) + (2^k - 1)
// (no cancellation: for k < 0 the sum is below -0.29), expm1(r) by its Taylor series to r^9 / 9!
// (truncation below 3e-10). Within 1 ulp of the exact value (0.87 measured); exactly 0 at v = 0.
inline __m512 expm1_negative(__m512 v) {
  v = _mm512_max_ps(v, _mm512_set1_ps(-88.f));  // expm1 is -1 in float32 from about -17 on
  __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(v, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693145751953125f), v);  // ln 2, high bits
  r = _mm512_fnmadd_ps(k, _mm512_set1_ps(1.428606765330187e-06f), r);     // and the rest
  __m512 q = _mm512_set1_ps(1.f / 362880);
  for (float c : {1.f / 40320, 1.f / 5040, 1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 1.f / 2})
    q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(c));
  __m512 expm1_r = _mm512_fmadd_ps(_mm512_mul_ps(r, r), q, r);
  __m512 two_k = _mm512_scalef_ps(_mm512_set1_ps(1.f), k);
  return _mm512_fmadd_ps(two_k, expm1_r, _mm512_sub_ps(two_k, _mm512_set1_ps(1.f)));
}

// y = ELU(x) = max(x, 0) + expm1(min(x, 0)) over n floats.
void elu_span(const float* x, float* y, size_t n) {
  const __m512 zero = _mm512_setzero_ps();
  for (size_t i = 0; i < n; i += LANES) {
    auto part = static_cast<__mmask16>(n - i >= LANES ? 0xffff : (1u << (n - i)) - 1);
    __m512 v = _mm512_maskz_loadu_ps(part, x + i);
    __m512 out = _mm512_add_ps(_mm512_max_ps(v, zero), expm1_negative(_mm512_min_ps(v, zero)));
    _mm512_mask_storeu_ps(y + i, part, out);
  }
}

// EnCodec's activation, where MLX's CPU backend computes expm1 one element at a time on one thread.
class Elu : public CpuPrimitive {
 public:
  explicit Elu(mx::Stream stream) : CpuPrimitive(stream, "Elu") {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    auto& encoder = mx::cpu::get_command_encoder(stream());
    encode(encoder, inputs, out);
    encoder.dispatch([in = Inputs(inputs, 1), y = out.data<float>(), n = out.size()] {
      std::vector<std::vector<float>> buffers;  // a copy of a strided view
      const float* x = in.row_major(buffers)[0];
      constexpr size_t BLOCK = 1 << 12;
      int blocks = static_cast<int>((n + BLOCK - 1) / BLOCK);
      in_two(blocks, 1, n >= (1 << 16), [=](int b0, int b1) {
        size_t start = b0 * BLOCK, stop = std::min(n, b1 * BLOCK);
        elu_span(x + start, y + start, stop - start);
      });
    });
  }

  bool is_equivalent(const mx::Primitive&) const override { return true; }
};

mx::array elu(const mx::array& x) {
  if (x.dtype() != mx::float32) throw std::invalid_argument("elu: float32 x");
  return mx::array(x.shape(), mx::float32,
                   std::make_shared<Elu>(mx::default_stream(mx::Device::cpu)), {x});
}

}  // namespace

NB_MODULE(_cpu_kernels, m) {
  m.def("elu", &elu, nb::arg("x"), "ELU (alpha 1) of float32 x, over both cores.");
  m.def("few_row_product", &few_row_product, nb::arg("x"), nb::arg("w"),
        "x (..., k) @ W^T for float32 W (n, k) and 1 to 8 rows of x.");
  m.def("quantized_product", &quantized_product, nb::arg("x"), nb::arg("w"), nb::arg("scales"),
        nb::arg("biases"), nb::arg("bits"),
        "x (..., k) @ dequantize(W)^T for MLX's 8- or 4-bit affine quantization (groups of 64) and 1 "
        "to 8 rows of x.");
  m.def("layer_norm", &layer_norm, nb::arg("x"), nb::arg("weight"), nb::arg("bias"), nb::arg("eps"),
        "Layer norm of float32 x (..., d) over its last axis.");
  m.def("attention_inputs", &attention_inputs, nb::arg("x"), nb::arg("norm_weight"),
        nb::arg("norm_bias"), nb::arg("q_proj"), nb::arg("k_proj"), nb::arg("v_proj"),
        nb::arg("scale"), nb::arg("eps"), nb::arg("quantization") = std::vector<mx::array>(),
        nb::arg("bits") = 0,
        "(3, rows, d): the scaled queries, keys and values of layer_norm(x) for 1 to 8 rows; with "
        "bits 8 or 4, quantized projections and their [scales, biases] x 3 in `quantization`.");
  m.def("layer_rest", &layer_rest, nb::arg("x"), nb::arg("qkv"), nb::arg("keys"),
        nb::arg("values"), nb::arg("weights"), nb::arg("cross"), nb::arg("heads"),
        nb::arg("text_rows"), nb::arg("scale"), nb::arg("eps"),
        nb::arg("quantization") = std::vector<mx::array>(), nb::arg("bits") = 0,
        "A decoder layer's step after its cache write: self-attention over keys/values, output "
        "projection, cross-attention of the first text_rows rows, GELU feed-forward.");
}
