// The float64 reference backward: SPEC sections 5 and 7 (shadow training,
// frozen seeds) and docs/DESIGN.md decisions 2-6, one seed at a time.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "backends.hpp"
#include "core/storage.hpp"
#include "core/validation.hpp"
#include "kasmina/reference.hpp"
#include "reference/seed_math.hpp"

namespace kasmina::reference {

namespace {

// SPEC §5 table, column dX, for one row chunk of a blending seed.
void blend_input_grad(const oracle::Seed& seed, const double* X, const double* G, int64_t chunk,
                      double* dX) {
  const double a = seed.a;
  const std::vector<double>& w = seed.w;
  for (int64_t j = 0; j < chunk; ++j) {
    const auto uj = static_cast<std::size_t>(j);
    double through_t = 0.0;  // d T / d X applied to G
    switch (seed.kind) {
      case Kind::residual:
        through_t = G[j];
        break;
      case Kind::attention:
        through_t = seed.p[uj] * G[j];
        break;
      case Kind::mlp:
        through_t = X[j] * w[uj] > 0.0 ? seed.sigma * w[uj] * G[j] : 0.0;
        break;
      case Kind::conv: {
        // X[j] feeds T[j], T[j+1], T[j+2]; zero past the chunk end.
        const double g1 = j + 1 < chunk ? G[j + 1] : 0.0;
        const double g2 = j + 2 < chunk ? G[j + 2] : 0.0;
        through_t = seed.sigma * (w[0] * G[j] + w[1] * g1 + w[2] * g2);
        break;
      }
    }
    dX[j] = (1.0 - a) * G[j] + a * through_t;
  }
}

// SPEC §5 table, columns dw and dσ, for one row chunk, with a = a_eff (the
// seed's a, or 1 under shadow training). ATTENTION only gathers q here; its
// dw needs the sum over all rows first.
void accumulate_blueprint_grads(const oracle::Seed& seed, double a_eff, const double* X,
                                const double* G, int64_t chunk, std::vector<double>& dw,
                                double& dsigma, std::vector<double>& q) {
  const std::vector<double>& w = seed.w;
  for (int64_t j = 0; j < chunk; ++j) {
    const auto uj = static_cast<std::size_t>(j);
    switch (seed.kind) {
      case Kind::residual:
        dw[uj] += a_eff * seed.sigma * G[j];
        dsigma += a_eff * G[j] * w[uj];
        break;
      case Kind::attention:
        q[uj] += a_eff * G[j] * X[j];
        break;
      case Kind::mlp: {
        const double pre = X[j] * w[uj];
        if (pre > 0.0) dw[uj] += a_eff * seed.sigma * G[j] * X[j];
        dsigma += a_eff * G[j] * std::max(pre, 0.0);
        break;
      }
      case Kind::conv: {
        const double x1 = j >= 1 ? X[j - 1] : 0.0;
        const double x2 = j >= 2 ? X[j - 2] : 0.0;
        dw[0] += a_eff * seed.sigma * G[j] * X[j];
        dw[1] += a_eff * seed.sigma * G[j] * x1;
        dw[2] += a_eff * seed.sigma * G[j] * x2;
        dsigma += a_eff * G[j] * (w[0] * X[j] + w[1] * x1 + w[2] * x2);
        break;
      }
    }
  }
}

}  // namespace

BackwardResult backward(const BackwardParams& params) {
  kasmina::detail::validate_backward(params, Backend::reference, kasmina::detail::Outputs::ignored);
  const int64_t rows = params.rows;
  const int64_t hidden = params.hidden;
  const int32_t num_seeds = params.num_seeds;
  const int64_t chunk = hidden / num_seeds;
  const int32_t num_blueprints = params.registry.num_blueprints;
  const int64_t x_stride = params.x_row_stride != 0 ? params.x_row_stride : hidden;
  const int64_t dy_stride = params.dy_row_stride != 0 ? params.dy_row_stride : hidden;

  BackwardResult result;
  result.dx.assign(static_cast<std::size_t>(rows * hidden), 0.0);
  // DESIGN 3: every output fully written, rows nobody contributes to are zero.
  result.dweights.assign(static_cast<std::size_t>(num_blueprints * chunk), 0.0);
  result.dscales.assign(static_cast<std::size_t>(num_blueprints), 0.0);
  result.dalpha.assign(static_cast<std::size_t>(num_seeds), 0.0);
  result.grad_stats.assign(static_cast<std::size_t>(num_seeds) * kGradStatsWidth, 0.0);

  const auto uchunk = static_cast<std::size_t>(chunk);
  std::vector<double> X(uchunk), G(uchunk), T(uchunk), Y(uchunk), dX(uchunk);
  for (int32_t s = 0; s < num_seeds; ++s) {
    const oracle::Seed seed = oracle::load_seed(params.seeds, params.registry, s, chunk);
    const int64_t col0 = s * chunk;
    const bool blueprint_grads = seed.grafted || seed.shadow;
    // SPEC §7: shadow training gives the blueprint the grads of a = 1.
    const double a_eff = seed.shadow ? 1.0 : seed.a;
    // DESIGN 6: dalpha for grafted stages with 0 <= alpha <= 1 only.
    const bool alpha_grad = seed.grafted && seed.alpha >= 0.0 && seed.alpha <= 1.0;

    std::vector<double> dw(uchunk, 0.0), q(uchunk, 0.0);
    double dsigma = 0.0, dalpha = 0.0;
    oracle::Welford moments;
    double sum_squares = 0.0, max_abs = 0.0;

    for (int64_t n = 0; n < rows; ++n) {
      oracle::load_chunk(params.dtype, params.x, x_stride, n, col0, chunk, X.data());
      oracle::load_chunk(params.dtype, params.dy, dy_stride, n, col0, chunk, G.data());
      // T is needed by the clamp mask and by dalpha; a shadow seed's T feeds
      // nothing here (its grads use X and G only).
      oracle::seed_output(seed, X.data(), chunk, T.data(), Y.data());
      if (params.clamp.enabled) {
        // DESIGN 4: G passes where lo <= Y <= hi (Y before the clamp); NaN Y fails.
        const double lo = static_cast<double>(params.clamp.lo);
        const double hi = static_cast<double>(params.clamp.hi);
        for (std::size_t j = 0; j < uchunk; ++j) {
          if (!(lo <= Y[j] && Y[j] <= hi)) G[j] = 0.0;
        }
      }
      if (params.clip_enabled) {
        // SPEC §5 / DESIGN 5: per-row clip of the chunk of G after the mask.
        double norm_sq = 0.0;
        for (double g : G) norm_sq += g * g;
        const double factor =
            std::min(1.0, static_cast<double>(params.clip_norm) / (std::sqrt(norm_sq) + 1e-6));
        for (double& g : G) g *= factor;
      }

      if (seed.blends) {
        blend_input_grad(seed, X.data(), G.data(), chunk, dX.data());
      } else {
        std::copy(G.begin(), G.end(), dX.begin());  // SPEC §5: not blending, dX = G
      }
      if (blueprint_grads) {
        accumulate_blueprint_grads(seed, a_eff, X.data(), G.data(), chunk, dw, dsigma, q);
      }
      if (alpha_grad) {
        for (std::size_t j = 0; j < uchunk; ++j) dalpha += G[j] * (T[j] - X[j]);  // SPEC §5
      }
      for (std::size_t j = 0; j < uchunk; ++j) {
        result.dx[static_cast<std::size_t>(n * hidden + col0) + j] = dX[j];
        // SPEC §5 statistics over dX, DESIGN 2: working precision, population variance.
        moments.add(dX[j]);
        sum_squares += dX[j] * dX[j];
        max_abs = std::max(max_abs, std::fabs(dX[j]));
      }
    }

    if (blueprint_grads && seed.kind == Kind::attention) {
      // SPEC §5: dw = p ⊙ (q - <p, q>), the softmax Jacobian applied to q.
      double pq = 0.0;
      for (std::size_t j = 0; j < uchunk; ++j) pq += seed.p[j] * q[j];
      for (std::size_t j = 0; j < uchunk; ++j) dw[j] = seed.p[j] * (q[j] - pq);
    }
    if (blueprint_grads) {
      // DESIGN 3: seeds sharing a row add into it in seed order.
      for (std::size_t j = 0; j < uchunk; ++j) {
        result.dweights[static_cast<std::size_t>(seed.blueprint) * uchunk + j] += dw[j];
      }
      result.dscales[static_cast<std::size_t>(seed.blueprint)] += dsigma;
    }
    result.dalpha[static_cast<std::size_t>(s)] = dalpha;
    double* stats = result.grad_stats.data() + static_cast<std::size_t>(s) * kGradStatsWidth;
    stats[kGradL2Norm] = std::sqrt(sum_squares);
    stats[kGradVariance] = moments.variance();
    stats[kGradMaxAbs] = max_abs;
  }
  return result;
}

}  // namespace kasmina::reference

namespace kasmina::detail {

void backward_reference(const BackwardParams& params) {
  const reference::BackwardResult result = reference::backward(params);
  const int64_t hidden = params.hidden;
  const int64_t dx_stride = params.dx_row_stride != 0 ? params.dx_row_stride : hidden;
  for (int64_t n = 0; n < params.rows; ++n) {
    for (int64_t j = 0; j < hidden; ++j) {
      storage::store_double(params.dtype, params.dx, n * dx_stride + j,
                            result.dx[static_cast<std::size_t>(n * hidden + j)]);
    }
  }
  const auto to_float = [](const std::vector<double>& from, float* to) {
    for (std::size_t i = 0; i < from.size(); ++i) to[i] = static_cast<float>(from[i]);
  };
  to_float(result.dweights, params.dweights);
  to_float(result.dscales, params.dscales);
  to_float(result.dalpha, params.dalpha);
  to_float(result.grad_stats, params.grad_stats);
}

}  // namespace kasmina::detail
