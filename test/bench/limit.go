package bench

import (
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"runtime"
	"time"

	"golang.org/x/crypto/chacha20poly1305"
)

// The limit an encrypted path has on this machine: what the raw underlay
// costs per GB, plus sealing every byte at one end and opening it at the
// other with WireGuard's AEAD in the Go implementation wireguard-go uses.
// Everything a WireGuard path spends beyond that (copies, checksums,
// syscalls, hand-offs between goroutines) is what a faster data plane
// can win back.

// aeadMessage is the plaintext of one packet at the tunnel MTU the bench
// uses (1340).
const aeadMessage = 1340

// Limit is the physical limit of an encrypted path, on one underlay.
type Limit struct {
	// SealGBps and OpenGBps: ChaCha20-Poly1305 on one core, GB of
	// plaintext per second, in packets of aeadMessage bytes.
	SealGBps float64 `json:"seal_gbps"`
	OpenGBps float64 `json:"open_gbps"`
	// Underlays: the limit on each underlay the run measured.
	Underlays []UnderlayLimit `json:"underlays"`
}

// UnderlayLimit is the limit on one setting of the underlay.
type UnderlayLimit struct {
	GRO bool `json:"underlay_gro,omitempty"`
	// RawSecPerGB: the raw underlay's CPU seconds per GB (one stream).
	RawSecPerGB float64 `json:"raw_seconds_per_gb"`
	// SecPerGB: the raw cost plus sealing and opening each GB.
	SecPerGB float64 `json:"seconds_per_gb"`
	// Gbps: what the machine's cores could carry at SecPerGB.
	Gbps float64 `json:"gbps"`
}

// measureLimit times the AEAD and combines it with the raw underlay's
// cost measured in results.
func measureLimit(results []CaseResult, d time.Duration) Limit {
	seal, open := measureAEAD(d)
	l := Limit{SealGBps: seal, OpenGBps: open}
	for _, r := range results {
		if r.Name != "raw underlay" || len(r.Runs) == 0 || r.CPUSecPerGB == 0 {
			continue
		}
		l.Underlays = append(l.Underlays, underlayLimit(r.CPUSecPerGB, seal, open, r.GRO))
	}
	return l
}

func underlayLimit(raw, seal, open float64, gro bool) UnderlayLimit {
	u := UnderlayLimit{GRO: gro, RawSecPerGB: raw}
	if seal > 0 && open > 0 {
		u.SecPerGB = raw + 1/seal + 1/open
		u.Gbps = float64(runtime.NumCPU()) / u.SecPerGB * 8
	}
	return u
}

// measureAEAD seals, then opens, aeadMessage-byte packets on the calling
// goroutine for d each, and returns GB of plaintext per second of each.
// Nonces count up as WireGuard's do.
func measureAEAD(d time.Duration) (seal, open float64) {
	key := make([]byte, chacha20poly1305.KeySize)
	_, _ = rand.Read(key)
	aead, err := chacha20poly1305.New(key)
	if err != nil {
		return 0, 0
	}
	plain := make([]byte, aeadMessage)
	_, _ = rand.Read(plain)
	var nonce [chacha20poly1305.NonceSize]byte
	sealed := aead.Seal(nil, nonce[:], plain, nil)
	buf := make([]byte, 0, len(sealed))
	rate := func(op func(ctr uint64) error) float64 {
		var n uint64
		start := time.Now()
		for time.Since(start) < d {
			// Check the clock every 256 packets, not every packet.
			for range 256 {
				if op(n) != nil {
					return 0
				}
				n++
			}
		}
		return float64(n) * aeadMessage / time.Since(start).Seconds() / 1e9
	}
	seal = rate(func(ctr uint64) error {
		binary.LittleEndian.PutUint64(nonce[4:], ctr)
		buf = aead.Seal(buf[:0], nonce[:], plain, nil)
		return nil
	})
	// Opening checks the tag: open the one sealed packet again and again.
	binary.LittleEndian.PutUint64(nonce[4:], 0)
	open = rate(func(uint64) error {
		var err error
		buf, err = aead.Open(buf[:0], nonce[:], sealed, nil)
		return err
	})
	return seal, open
}

// markdown says what the limit is and how far each WireGuard case is from
// it.
func (l *Limit) markdown(r *Report, p func(string, ...any)) {
	p("")
	p("### The limit on this machine")
	p("")
	p("ChaCha20-Poly1305 (golang.org/x/crypto, as wireguard-go uses it) on one core, %d-byte packets: seal %.2f GB/s,",
		aeadMessage, l.SealGBps)
	p("open %.2f GB/s. An encrypted path costs at least what the raw underlay costs plus sealing at one end and", l.OpenGBps)
	p("opening at the other; on this machine's %d cores that is the limit below. The cases' cost is the median", runtime.NumCPU())
	p("CPU seconds per GB of one TCP stream.")
	p("")
	p("| underlay | raw | limit: raw + seal + open | at most | wireguard-go | wgmesh |")
	p("|---|---|---|---|---|---|")
	for _, u := range l.Underlays {
		name := "as the lab makes it (GRO off)"
		if u.GRO {
			name = "GRO on"
		}
		cost := func(c *CaseResult) string {
			if c == nil || len(c.Runs) == 0 || u.SecPerGB == 0 {
				return "—"
			}
			return fmt.Sprintf("%.2f s/GB (%.1f× the limit)", c.CPUSecPerGB, c.CPUSecPerGB/u.SecPerGB)
		}
		p("| %s | %.2f s/GB | %.2f s/GB | %.1f Gbit/s | %s | %s |", name, u.RawSecPerGB, u.SecPerGB, u.Gbps,
			cost(r.dataCaseOn("wireguard-go", u.GRO)), cost(r.dataCaseOn("wgmesh", u.GRO)))
	}
}
