// Float32 CPU kernels for the decoder step (x86-64 with AVX-512), as MLX primitives.
//
// - few_row_product(x, w): x (..., k) @ W^T for W (n, k) and one or two rows of x (classifier-free
//   guidance's pair). W is read once for both rows, four of its rows at a time; OpenBLAS packs W
//   for a 2-row product (sgemm) or runs its small-matrix path on one thread.
// - cached_attention(q, keys, values): softmax(q K^T) V for one query per head over a key/value
//   cache whose positions are rows of head_dim floats: scores, softmax and the weighted sum in one
//   pass per head, where MLX runs about eight operations a layer. The cache may be float16 (read
//   as such, widened in registers: half the bytes of a long cache).
// - layer_norm(x, weight, bias, eps): one operation, where MLX's CPU backend runs five.
//
// Both split their work with a helper thread that spins briefly between jobs: two cores on one
// MLX stream, joined in microseconds (a join between two MLX streams costs tens). Compiled on
// first use by musicgen/cpu_kernels.py.

#include <immintrin.h>

#include <atomic>
#include <cmath>
#include <functional>
#include <stdexcept>
#include <thread>
#include <vector>

#include <nanobind/nanobind.h>

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

// ------------------------------------------------------------------------------- few_row_product

// y[r * n + j] = x[r] . W[j] for rows r < M (1 or 2) and weight rows j in [j0, j1).
template <int M>
void few_rows(const float* x, const float* w, float* y, int n, int k, int j0, int j1) {
  const float* x1 = x + (M - 1) * k;
  const int body = k / LANES * LANES, tail = k - body;
  int j = j0;
  for (; j + 4 <= j1; j += 4) {
    const float* w0 = w + static_cast<size_t>(j) * k;
    const float *w1 = w0 + k, *w2 = w1 + k, *w3 = w2 + k;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    auto step = [&](__m512 v0, __m512 v1, __m512 v2, __m512 v3, __m512 u, __m512 t) {
      a0 = _mm512_fmadd_ps(v0, u, a0), a1 = _mm512_fmadd_ps(v1, u, a1);
      a2 = _mm512_fmadd_ps(v2, u, a2), a3 = _mm512_fmadd_ps(v3, u, a3);
      if constexpr (M == 2) {
        b0 = _mm512_fmadd_ps(v0, t, b0), b1 = _mm512_fmadd_ps(v1, t, b1);
        b2 = _mm512_fmadd_ps(v2, t, b2), b3 = _mm512_fmadd_ps(v3, t, b3);
      }
    };
    for (int c = 0; c < body; c += LANES)
      step(_mm512_loadu_ps(w0 + c), _mm512_loadu_ps(w1 + c), _mm512_loadu_ps(w2 + c),
           _mm512_loadu_ps(w3 + c), _mm512_loadu_ps(x + c), _mm512_loadu_ps(x1 + c));
    if (tail)
      step(load_part(w0 + body, tail), load_part(w1 + body, tail), load_part(w2 + body, tail),
           load_part(w3 + body, tail), load_part(x + body, tail), load_part(x1 + body, tail));
    y[j] = _mm512_reduce_add_ps(a0), y[j + 1] = _mm512_reduce_add_ps(a1);
    y[j + 2] = _mm512_reduce_add_ps(a2), y[j + 3] = _mm512_reduce_add_ps(a3);
    if constexpr (M == 2) {
      y[n + j] = _mm512_reduce_add_ps(b0), y[n + j + 1] = _mm512_reduce_add_ps(b1);
      y[n + j + 2] = _mm512_reduce_add_ps(b2), y[n + j + 3] = _mm512_reduce_add_ps(b3);
    }
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

class FewRowProduct : public mx::UnaryPrimitive {
 public:
  explicit FewRowProduct(mx::Stream stream) : mx::UnaryPrimitive(stream) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const auto& x = inputs[0];
    const auto& w = inputs[1];
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    encoder.set_input_array(x);
    encoder.set_input_array(w);
    encoder.set_output_array(out);
    int k = x.shape(-1), rows = x.size() / k, n = w.shape(0);
    encoder.dispatch([x_data = x.data<float>(), x_layout = Layout(x), w_data = w.data<float>(),
                      w_layout = Layout(w), y = out.data<float>(), rows, n, k] {
      std::vector<float> x_buffer, w_buffer;  // copies of strided views (a weight never is one)
      const float* x = x_layout.row_major(x_data, x_buffer);
      const float* w = w_layout.row_major(w_data, w_buffer);
      in_two(n, 4, static_cast<long>(n) * k >= (1 << 16), [=](int j0, int j1) {
        if (rows == 1) few_rows<1>(x, w, y, n, k, j0, j1);
        else few_rows<2>(x, w, y, n, k, j0, j1);
      });
    });
  }

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("few_row_product runs on the CPU only");
  }

  const char* name() const override { return "FewRowProduct"; }
  bool is_equivalent(const mx::Primitive&) const override { return true; }
};

mx::array few_row_product(const mx::array& x, const mx::array& w) {
  if (x.dtype() != mx::float32 || w.dtype() != mx::float32 || w.ndim() != 2 || x.ndim() < 1 ||
      x.shape(-1) != w.shape(1))
    throw std::invalid_argument("few_row_product: float32 x (..., k) and W (n, k)");
  if (x.size() / x.shape(-1) > 2) throw std::invalid_argument("few_row_product: at most 2 rows");
  auto stream = mx::default_stream(mx::Device::cpu);
  auto shape = x.shape();
  shape.back() = w.shape(0);
  return mx::array(shape, mx::float32, std::make_shared<FewRowProduct>(stream), {x, w});
}

// ------------------------------------------------------------------------------ cached_attention

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

// One head: out = softmax(q K^T) V over `length` positions (rows of d floats), s: scratch.
template <class T>
void attend_head(const float* q, const T* keys, const T* values, float* out, int length, int d,
                 float* s) {
  const int blocks = (d + LANES - 1) / LANES, tail = d - (blocks - 1) * LANES;
  __m512 query[MAX_HEAD_DIM / LANES];
  for (int c = 0; c < blocks; c++) query[c] = load_part(q + c * LANES, c + 1 < blocks ? LANES : tail);
  float top = -INFINITY;
  for (int l = 0; l < length; l++) {
    const T* key = keys + static_cast<size_t>(l) * d;
    __m512 a = _mm512_setzero_ps();
    for (int c = 0; c < blocks; c++)
      a = _mm512_fmadd_ps(query[c], load_part(key + c * LANES, c + 1 < blocks ? LANES : tail), a);
    s[l] = _mm512_reduce_add_ps(a);
    top = std::max(top, s[l]);
  }
  __m512 total = _mm512_setzero_ps(), shift = _mm512_set1_ps(top);
  for (int l = 0; l < length; l += LANES) {
    auto mask = static_cast<__mmask16>(length - l >= LANES ? 0xffff : (1u << (length - l)) - 1);
    __m512 e = _mm512_maskz_mov_ps(mask, exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, s + l), shift)));
    _mm512_mask_storeu_ps(s + l, mask, e);
    total = _mm512_add_ps(total, e);
  }
  __m512 acc[MAX_HEAD_DIM / LANES];
  for (int c = 0; c < blocks; c++) acc[c] = _mm512_setzero_ps();
  for (int l = 0; l < length; l++) {
    __m512 weight = _mm512_set1_ps(s[l]);
    const T* value = values + static_cast<size_t>(l) * d;
    for (int c = 0; c < blocks; c++)
      acc[c] = _mm512_fmadd_ps(weight, load_part(value + c * LANES, c + 1 < blocks ? LANES : tail), acc[c]);
  }
  __m512 scale = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(total));
  for (int c = 0; c < blocks; c++) {
    auto mask = static_cast<__mmask16>(c + 1 < blocks ? 0xffff : (1u << tail) - 1);
    _mm512_mask_storeu_ps(out + c * LANES, mask, _mm512_mul_ps(acc[c], scale));
  }
}

class CachedAttention : public mx::UnaryPrimitive {
 public:
  explicit CachedAttention(mx::Stream stream) : mx::UnaryPrimitive(stream) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const auto& q = inputs[0];
    const auto& keys = inputs[1];
    const auto& values = inputs[2];
    int batch = keys.shape(0), heads = keys.shape(1), length = keys.shape(2), d = keys.shape(3);
    const auto &ks = keys.strides(), &vs = values.strides();
    if (ks[3] != 1 || ks[2] != d || vs[3] != 1 || vs[2] != d)
      throw std::runtime_error("cached_attention: each position's key and value must be contiguous");
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    encoder.set_input_array(q);
    encoder.set_input_array(keys);
    encoder.set_input_array(values);
    encoder.set_output_array(out);
    if (keys.dtype() == mx::float16)
      run<mx::float16_t>(encoder, q, keys, values, out, batch, heads, length, d);
    else
      run<float>(encoder, q, keys, values, out, batch, heads, length, d);
  }

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("cached_attention runs on the CPU only");
  }

  const char* name() const override { return "CachedAttention"; }

 private:
  template <class T>
  static void run(mx::cpu::CommandEncoder& encoder, const mx::array& q, const mx::array& keys,
                  const mx::array& values, mx::array& out, int batch, int heads, int length, int d) {
    const auto &ks = keys.strides(), &vs = values.strides();
    encoder.dispatch([data = q.data<float>(), layout = Layout(q), k = keys.data<T>(),
                      v = values.data<T>(), o = out.data<float>(), heads, length, d, kb = ks[0],
                      kh = ks[1], vb = vs[0], vh = vs[1], units = batch * heads] {
      std::vector<float> buffer;
      const float* q = layout.row_major(data, buffer);
      in_two(units, 1, static_cast<long>(units) * length >= 4096, [=](int u0, int u1) {
        std::vector<float> scores(length + LANES);
        for (int u = u0; u < u1; u++) {
          int b = u / heads, h = u % heads;
          attend_head(q + static_cast<size_t>(u) * d, k + b * kb + h * kh, v + b * vb + h * vh,
                      o + static_cast<size_t>(u) * d, length, d, scores.data());
        }
      });
    });
  }
};

mx::array cached_attention(const mx::array& q, const mx::array& keys, const mx::array& values) {
  bool kv_dtype = keys.dtype() == values.dtype() &&
                  (keys.dtype() == mx::float32 || keys.dtype() == mx::float16);
  if (q.dtype() != mx::float32 || !kv_dtype || keys.ndim() != 4 || keys.shape() != values.shape() ||
      q.ndim() != 4 || q.shape(2) != 1 || q.shape(0) != keys.shape(0) ||
      q.shape(1) != keys.shape(1) || q.shape(3) != keys.shape(3))
    throw std::invalid_argument(
        "cached_attention: float32 q (batch, heads, 1, d) and float32 or float16 keys/values "
        "(batch, heads, length, d)");
  if (keys.shape(3) > MAX_HEAD_DIM || keys.shape(2) < 1)
    throw std::invalid_argument("cached_attention: head_dim <= 256 and at least one position");
  auto stream = mx::default_stream(mx::Device::cpu);
  return mx::array(q.shape(), mx::float32, std::make_shared<CachedAttention>(stream),
                   {q, keys, values});
}

// ------------------------------------------------------------------------------------ layer_norm

// (x - mean) / sqrt(var + eps) * weight + bias over the last axis, one row at a time (MLX's CPU
// backend runs mx.fast.layer_norm as five operations).
class LayerNorm : public mx::UnaryPrimitive {
 public:
  LayerNorm(mx::Stream stream, float eps) : mx::UnaryPrimitive(stream), eps_(eps) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const auto& x = inputs[0];
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    for (const auto& a : inputs) encoder.set_input_array(a);
    encoder.set_output_array(out);
    int d = x.shape(-1), rows = x.size() / d;
    encoder.dispatch([x_data = x.data<float>(), x_layout = Layout(x), w_data = inputs[1].data<float>(),
                      w_layout = Layout(inputs[1]), b_data = inputs[2].data<float>(),
                      b_layout = Layout(inputs[2]), y = out.data<float>(), rows, d, eps = eps_] {
      std::vector<float> x_buffer, w_buffer, b_buffer;
      const float* x = x_layout.row_major(x_data, x_buffer);
      const float* w = w_layout.row_major(w_data, w_buffer);
      const float* b = b_layout.row_major(b_data, b_buffer);
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
    });
  }

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("layer_norm runs on the CPU only");
  }

  const char* name() const override { return "LayerNorm"; }
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

}  // namespace

NB_MODULE(_cpu_kernels, m) {
  m.def("few_row_product", &few_row_product, nb::arg("x"), nb::arg("w"),
        "x (..., k) @ W^T for float32 W (n, k) and one or two rows of x.");
  m.def("cached_attention", &cached_attention, nb::arg("q"), nb::arg("keys"), nb::arg("values"),
        "softmax(q K^T) V for float32 q (batch, heads, 1, d) over float32 or float16 keys/values "
        "(batch, heads, length, d).");
  m.def("layer_norm", &layer_norm, nb::arg("x"), nb::arg("weight"), nb::arg("bias"), nb::arg("eps"),
        "Layer norm of float32 x (..., d) over its last axis.");
}
