package bench

import (
	"fmt"
	"image"
	"image/color"
	"image/draw"
	"image/png"
	"os"

	"golang.org/x/image/font"
	"golang.org/x/image/font/basicfont"
	"golang.org/x/image/math/fixed"
)

// WriteChart draws the data-plane throughput as horizontal bars: one pair
// (1 and 4 TCP streams) per case, scaled to the fastest. Without data-plane
// results it writes nothing.
func (r *Report) WriteChart(path string) (written bool, err error) {
	var cases []CaseResult
	top := 0.0
	for _, c := range r.DataPlane {
		// An emulated case is on another scale altogether.
		if c.Skipped != "" || len(c.Runs) == 0 || c.Emulated {
			continue
		}
		cases = append(cases, c)
		top = max(top, c.TCP1Gbps, c.TCP4Gbps)
	}
	if len(cases) == 0 || top == 0 {
		return false, nil
	}
	const (
		labelW, barMax, rowH, pad = 140, 420, 34, 12
		w                         = labelW + barMax + 110
	)
	h := pad*2 + 20 + rowH*len(cases) + 24
	img := image.NewRGBA(image.Rect(0, 0, w, h))
	draw.Draw(img, img.Bounds(), image.NewUniform(color.White), image.Point{}, draw.Src)
	ink := color.RGBA{0x20, 0x20, 0x20, 0xff}
	one, four := color.RGBA{0x3b, 0x6e, 0xb5, 0xff}, color.RGBA{0xe0, 0x8a, 0x2c, 0xff}
	text := func(x, y int, s string, c color.Color) {
		d := font.Drawer{Dst: img, Src: image.NewUniform(c), Face: basicfont.Face7x13, Dot: fixed.P(x, y)}
		d.DrawString(s)
	}
	bar := func(x, y, width, height int, c color.Color) {
		draw.Draw(img, image.Rect(x, y, x+width, y+height), image.NewUniform(c), image.Point{}, draw.Src)
	}
	text(pad, pad+10, "TCP throughput between two simulated hosts (Gbit/s, median)", ink)
	for i, c := range cases {
		y := pad + 24 + i*rowH
		text(pad, y+17, c.Label(), ink)
		for j, v := range []float64{c.TCP1Gbps, c.TCP4Gbps} {
			col := []color.Color{one, four}[j]
			bw := int(v / top * barMax)
			by := y + j*13
			bar(labelW, by, bw, 11, col)
			text(labelW+bw+6, by+10, fmt.Sprintf("%.2f", v), ink)
		}
	}
	ly := h - pad - 4
	bar(labelW, ly-9, 10, 10, one)
	text(labelW+14, ly, "1 stream", ink)
	bar(labelW+90, ly-9, 10, 10, four)
	text(labelW+104, ly, "4 streams", ink)
	f, err := os.Create(path)
	if err != nil {
		return false, err
	}
	if err := png.Encode(f, img); err != nil {
		f.Close()
		return false, err
	}
	return true, f.Close()
}
